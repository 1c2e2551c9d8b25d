"""The OpenAI wire format: request checking and response bodies, with no HTTP and no engine.

``parse_request`` turns the JSON body of ``/v1/completions`` or ``/v1/chat/completions`` into a
``CompletionRequest`` (token ids + ``GenerateOptions``) or raises ``APIError`` with the status and
the OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``) the client gets.
The other functions build the response objects: a whole completion, stream chunks, and ``usage``
(prompt/completion/total tokens plus the request's speculative counters: ``draft_n``,
``draft_n_accepted``, ``mean_acceptance_length``, ``acceptance_per_position``).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from mtpspec.sampling import SamplingParams
from mtpspec.sequence import GenerateOptions, GenerationResult
from mtpspec.tokenizer import NoChatTemplateError, Tokenizer

MAX_STOP_STRINGS = 4
ROLES = ("system", "developer", "user", "assistant", "tool")
# fields we do not implement: accepted only at their "off" values
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
               "tools": (None, []), "functions": (None, []),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)}


class APIError(Exception):
    """A request the server refuses; ``body`` is what the client receives."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """What request checking needs to know about the served model."""

    name: str
    tokenizer: Tokenizer
    context: int                       # positions in a sequence's cache row
    max_new_tokens_for: Callable[[int], int]  # prompt length -> most new tokens allowed
    draft_k: int
    default_max_tokens: int = 256


@dataclass(frozen=True)
class CompletionRequest:
    chat: bool
    prompt_ids: list[int]
    options: GenerateOptions
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def parse_request(body: dict, chat: bool, model: ServedModel) -> CompletionRequest:
    """Check every field we read; raise ``APIError`` (400/404) naming the first bad one."""
    name = body.get("model")
    if name is not None and name != model.name:
        raise APIError(404, f"The model {name!r} does not exist; this server serves {model.name!r}",
                       param="model", code="model_not_found")
    for field_name, off in UNSUPPORTED.items():
        if body.get(field_name) not in off:
            raise APIError(400, f"{field_name} is not supported by this server", param=field_name,
                           code="unsupported_parameter")
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {n}", param="n")
    stream = _boolean(body, "stream", False)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    include_usage = _boolean(stream_options or {}, "include_usage", False, "stream_options.include_usage")
    prompt_ids = _chat_prompt(body, model) if chat else _text_prompt(body, model)

    room = model.max_new_tokens_for(len(prompt_ids))
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {model.context} tokens "
                            f"({model.draft_k + 1} of them reserved for drafting); the prompt has "
                            f"{len(prompt_ids)} tokens, which leaves no room for new tokens",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _integer(body, key, None, 1)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {model.context} tokens; you "
                            f"requested {len(prompt_ids) + max_tokens + model.draft_k + 1} "
                            f"({len(prompt_ids)} in the prompt, {max_tokens} for the completion, "
                            f"{model.draft_k + 1} reserved for drafting); reduce the prompt or "
                            f"{key} (at most {room} here)", param=key,
                       code="context_length_exceeded")
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=_integer(body, "top_k", 0, 0),
        seed=_integer(body, "seed", None, None))
    options = GenerateOptions(
        max_new_tokens=max_tokens if max_tokens is not None else min(room, model.default_max_tokens),
        sampling=sampling, stop=_stop(body), draft_k=model.draft_k,
        stop_token_ids=tuple(model.tokenizer.eos_ids))
    return CompletionRequest(chat, prompt_ids, options, stream, include_usage)


def _boolean(body: dict, key: str, default: bool, param: str | None = None) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{param or key} must be a boolean, got {value!r}", param=param or key)
    return value


def _integer(body: dict, key: str, default, low: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{key} must be an integer, got {value!r}", param=key)
    if low is not None and value < low:
        raise APIError(400, f"{key} must be >= {low}, got {value}", param=key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float,
            open_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{key} must be a number, got {value!r}", param=key)
    if value > high or value < low or (open_low and value == low):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{key} must be in {interval}, got {value!r}", param=key)
    return float(value)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or any(not isinstance(s, str) or not s for s in stops)):
        raise APIError(400, f"stop must be a non-empty string or a list of up to "
                            f"{MAX_STOP_STRINGS} non-empty strings", param="stop")
    return tuple(stops)


def _text_prompt(body: dict, model: ServedModel) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return model.tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = model.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must lie in 0..{vocab - 1}", param="prompt")
        return list(prompt)
    if prompt is None:
        raise APIError(400, "you must provide a prompt", param="prompt", code="missing_required_parameter")
    raise APIError(400, "prompt must be a string, a list of token ids, or a list with one of "
                        "those (one prompt per request)", param="prompt")


def _chat_prompt(body: dict, model: ServedModel) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "you must provide messages", param="messages",
                       code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    rendered_messages = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}",
                           param=f"{where}.role")
        rendered_messages.append({"role": role, "content": _content(message.get("content"), where)})
    try:
        text = model.tokenizer.apply_chat_template(rendered_messages)
    except NoChatTemplateError as err:
        raise APIError(400, f"{err} Use /v1/completions with a prompt.", param="messages",
                       code="no_chat_template") from None
    except ValueError as err:  # the template refused the conversation (e.g. role order)
        raise APIError(400, str(err), param="messages") from None
    return model.tokenizer.encode(text, add_bos=False)  # the template writes the bos token


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where}.content must be a string or a list of text parts",
                   param=f"{where}.content")


# --- responses -------------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, result: GenerationResult) -> dict:
    stats = result.stats
    completion = len(result.token_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "draft_n": stats.draft_proposed, "draft_n_accepted": stats.draft_accepted,
            "mean_acceptance_length": round(stats.tau, 4),
            "acceptance_per_position": [round(x, 4) for x in stats.acceptance_per_position]}


def completion(request: CompletionRequest, ident: str, model: str, result: GenerationResult) -> dict:
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "logprobs": None, "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None,
                  "finish_reason": result.finish_reason}
    return {"id": ident, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(len(request.prompt_ids), result)}


def chunk(request: CompletionRequest, ident: str, model: str, text: str | None,
          finish_reason: str | None = None, first: bool = False) -> dict:
    """One stream chunk: new text, or (text None) the closing chunk with its finish reason."""
    if request.chat:
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": ident, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(request: CompletionRequest, ident: str, model: str, result: GenerationResult) -> dict:
    return {"id": ident, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(len(request.prompt_ids), result)}
