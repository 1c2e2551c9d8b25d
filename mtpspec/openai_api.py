"""The OpenAI wire format: request checking and response bodies, with no HTTP and no engine.

``parse_body`` reads a JSON body (bounded nesting: a body of 100,000 ``[`` is a 400, not a
crash); ``parse_request`` checks it against pydantic models of ``/v1/completions`` and
``/v1/chat/completions`` (strict types, ranges, ``extra="forbid"``) and turns it into a
``CompletionRequest`` (token ids + ``GenerateOptions``), or raises ``APIError`` with the status and
the OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``) the client gets.
A field the server does not implement is refused with a 400 naming it, never ignored; OpenAI
fields that change nothing at their neutral value (``frequency_penalty: 0``, ``logit_bias: {}``,
``response_format: {"type": "text"}``) are accepted at that value only.

The other functions build the response objects: a whole completion, stream chunks, logprobs in
OpenAI's two shapes (completions: ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``;
chat: ``content`` entries), and ``usage`` (prompt/completion/total tokens plus the speculative
counters ``draft_n``, ``draft_n_accepted``, ``mean_acceptance_length``, ``acceptance_per_position``).

Two extensions of the request, both off by default so an OpenAI client sees OpenAI's shapes:
``draft_k`` (0 up to the server's ``--draft-k``) sets the request's longest draft, and
``draft_k: 0`` decodes it plainly (the same tokens, one target pass per token: what a side-by-side
comparison needs); ``stream_options.include_draft`` adds to every stream chunk's choice a
``tokens`` list, one entry per token whose text the chunk completes:
``{"id": token id, "from_draft": accepted draft (true) or the target's own token (false),
"drafted": drafts checked by the verification step that emitted it}``. A step emits its accepted
drafts then one target token: the bonus when ``drafted`` equals the drafts accepted before it,
else the correction of the first rejected draft.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtpspec.sampling import GREEDY_BELOW, SamplingParams
from mtpspec.sequence import MAX_LOGPROBS, GenerateOptions, GenerationResult
from mtpspec.tokenizer import NoChatTemplateError, Tokenizer

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1024       # per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_N = 8                   # choices per request
MAX_MESSAGES = 1024
SEED_RANGE = (-(1 << 63), 1 << 64)  # what clients send (int64 or uint64); folded for the generator
ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI fields this server does not implement, accepted only at a value that changes nothing
NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
           "best_of": (1,), "suffix": ("",), "tools": ([],), "functions": ([],),
           "tool_choice": ("none",), "response_format": ({"type": "text"},),
           "parallel_tool_calls": (False,)}

Number = Annotated[float, Field(allow_inf_nan=False)]


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


# --- request models ---------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_draft: bool | None = None  # extension: per-token provenance in chunks (docstring)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart]
    name: str | None = None


class _Common(_Strict):
    """Fields both endpoints take."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # vLLM's extension; 0 turns it off
    draft_k: Annotated[int, Field(ge=0, le=32)] | None = None  # extension; 0: plain decoding
    seed: Annotated[int, Field(ge=SEED_RANGE[0], lt=SEED_RANGE[1])] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # accepted at their neutral values only (NEUTRAL)
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatBody(_Common):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


_FIELDS = frozenset(name for model in (CompletionBody, ChatBody, Message, TextPart, StreamOptions)
                    for name in model.model_fields)


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
    n: int = 1
    echo: bool = False            # completions: the prompt (and its logprobs) before the text
    logprobs: int | None = None   # None: off; else alternatives per token
    include_draft: bool = False   # stream chunks carry per-token provenance (``tokens``)

    def choice_options(self, index: int) -> GenerateOptions:
        """Options of choice ``index``: a seeded request's choice i uses seed + i."""
        sampling = self.options.sampling
        if index == 0 or sampling.seed is None:
            return self.options
        return dataclasses.replace(
            self.options, sampling=dataclasses.replace(sampling, seed=sampling.seed + index))


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body (nesting is bounded by the parser)."""
    try:
        body = pydantic_core.from_json(raw)
    except ValueError as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def parse_request(body: dict, chat: bool, model: ServedModel) -> CompletionRequest:
    """Check every field; raise ``APIError`` (400/404) naming the first bad one."""
    name = body.get("model")
    if isinstance(name, str) and name != model.name:
        raise APIError(404, f"The model {name!r} does not exist; this server serves {model.name!r}",
                       param="model", code="model_not_found")
    try:
        request = (ChatBody if chat else CompletionBody).model_validate(body)
    except ValidationError as err:
        raise _validation_error(err) from None
    for field_name, neutral in NEUTRAL.items():
        value = getattr(request, field_name, None)
        if value is not None and value not in neutral:
            raise APIError(400, f"{field_name} is not supported by this server (only "
                                f"{' or '.join(repr(v) for v in neutral)})", param=field_name,
                           code="unsupported_parameter")
    prompt_ids = _chat_prompt(request, model) if chat else _text_prompt(request, model)
    vocab = model.tokenizer.vocab_size
    stop_ids = tuple(request.stop_token_ids or ())
    if any(not 0 <= t < vocab for t in stop_ids):
        raise APIError(400, f"stop_token_ids must lie in 0..{vocab - 1}", param="stop_token_ids")
    stops = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop strings must hold 1..{MAX_STOP_CHARS} characters", param="stop")

    room = model.max_new_tokens_for(len(prompt_ids))
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {model.context} tokens "
                            f"({model.draft_k + 1} of them reserved for drafting); the prompt has "
                            f"{len(prompt_ids)} tokens, which leaves no room for new tokens",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    key, max_tokens = "max_tokens", request.max_tokens
    if chat and request.max_completion_tokens is not None:
        key, max_tokens = "max_completion_tokens", request.max_completion_tokens
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {model.context} tokens; you "
                            f"requested {len(prompt_ids) + max_tokens + model.draft_k + 1} "
                            f"({len(prompt_ids)} in the prompt, {max_tokens} for the completion, "
                            f"{model.draft_k + 1} reserved for drafting); reduce the prompt or "
                            f"{key} (at most {room} here)", param=key,
                       code="context_length_exceeded")
    temperature = 1.0 if request.temperature is None else request.temperature
    sampling = SamplingParams(
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,  # vLLM's rule
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0, seed=request.seed)
    n = request.n or 1
    if n > 1 and sampling.greedy:
        raise APIError(400, "n > 1 needs sampling (temperature > 0): greedy choices are equal",
                       param="n")
    if chat:
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        if request.top_logprobs and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        echo = False
    else:
        logprobs, echo = request.logprobs, bool(request.echo)
    stream = bool(request.stream)
    if echo and stream:
        raise APIError(400, "echo is not supported with stream", param="echo")
    draft_k = model.draft_k if request.draft_k is None else request.draft_k
    if draft_k > model.draft_k:
        raise APIError(400, f"draft_k must lie in 0..{model.draft_k} on this server (its "
                            f"--draft-k{'; it decodes plainly' if model.draft_k == 0 else ''})",
                       param="draft_k")
    options = GenerateOptions(
        max_new_tokens=max_tokens if max_tokens is not None else min(room, model.default_max_tokens),
        sampling=sampling, stop=stops, draft_k=draft_k,
        stop_token_ids=tuple(model.tokenizer.eos_ids) + stop_ids, logprobs=logprobs,
        prompt_logprobs=logprobs if echo else None)
    stream_options = request.stream_options or StreamOptions()
    return CompletionRequest(chat, prompt_ids, options, stream, bool(stream_options.include_usage),
                             n, echo, logprobs, bool(stream_options.include_draft))


def _validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field."""
    errors = err.errors(include_url=False)
    extra = [str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        return APIError(400, f"unsupported parameter(s): {', '.join(extra)}; this server does "
                             f"not implement them", param=extra[0], code="unsupported_parameter")
    first = errors[0]
    param = ""
    for part in first["loc"]:  # stop at pydantic's union tags ("str", "list[int]", ...)
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _FIELDS:
            param += f".{part}" if param else part
        else:
            break
    missing = first["type"] == "missing"
    message = f"{param or 'body'}: {first['msg']}"
    if not missing and "input" in first and len(repr(first["input"])) <= 80:
        message += f", got {first['input']!r}"
    return APIError(400, message, param=param or None,
                    code="missing_required_parameter" if missing else "invalid_value")


def _text_prompt(request: CompletionBody, model: ServedModel) -> list[int]:
    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return model.tokenizer.encode(prompt)
    if prompt and all(isinstance(t, int) for t in prompt):
        vocab = model.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must lie in 0..{vocab - 1}", param="prompt")
        return list(prompt)
    raise APIError(400, "prompt must be a non-empty string, a list of token ids, or a list with "
                        "one of those (one prompt per request)", param="prompt")


def _chat_prompt(request: ChatBody, model: ServedModel) -> list[int]:
    messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else "".join(part.text for part in m.content)} for m in request.messages]
    try:
        text = model.tokenizer.apply_chat_template(messages)
    except NoChatTemplateError as err:
        raise APIError(400, f"{err} Use /v1/completions with a prompt.", param="messages",
                       code="no_chat_template") from None
    except ValueError as err:  # the template refused the conversation (e.g. role order)
        raise APIError(400, str(err), param="messages") from None
    return model.tokenizer.encode(text, add_bos=False)  # the template writes the bos token


# --- responses -------------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, results: list[GenerationResult]) -> dict:
    stats = results[0].stats
    for result in results[1:]:
        stats = stats.merge(result.stats)
    completion = sum(len(result.token_ids) for result in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "draft_n": stats.draft_proposed, "draft_n_accepted": stats.draft_accepted,
            "mean_acceptance_length": round(stats.tau, 4),
            "acceptance_per_position": [round(x, 4) for x in stats.acceptance_per_position]}


def logprobs_body(request: CompletionRequest, tokenizer: Tokenizer,
                  entries: list, first_offset: int = 0) -> dict | None:
    """``choices[i].logprobs`` for ``entries`` (``TokenLogprob``s; an echoed prompt's first
    token has logprob None)."""
    if request.logprobs is None:
        return None
    text = lambda token: tokenizer.decode([token])  # noqa: E731
    if request.chat:
        return {"content": [
            {"token": text(e.token_id), "logprob": e.logprob,
             "bytes": token_bytes(tokenizer, e.token_id),
             "top_logprobs": [{"token": text(t), "logprob": lp,
                               "bytes": token_bytes(tokenizer, t)} for t, lp in e.top]}
            for e in entries]}
    tokens, offsets, offset = [], [], first_offset
    for entry in entries:
        tokens.append(text(entry.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "text_offset": offsets,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(t): lp for t, lp in e.top} if e.logprob is not None else None
                             for e in entries]}


def token_bytes(tokenizer: Tokenizer, token: int) -> list[int]:
    """A token's own bytes: a byte-fallback piece ``<0xE2>`` is one byte, which decodes alone to
    U+FFFD; any other token is its text in UTF-8."""
    piece = tokenizer.id_to_token(token) or ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return [int(piece[3:5], 16)]
        except ValueError:
            pass
    return list(tokenizer.decode([token]).encode())


def completion(request: CompletionRequest, ident: str, model: str,
               results: list[GenerationResult], tokenizer: Tokenizer) -> dict:
    choices = []
    for index, result in enumerate(results):
        entries: list = list(result.logprobs or [])
        text = result.text
        if request.echo:
            text = tokenizer.decode(request.prompt_ids) + text
            if request.logprobs is not None:
                prompt_entries = result.prompt_logprobs or []
                entries = [_NoContext(request.prompt_ids[0])] + prompt_entries[1:] + entries
        logprobs = logprobs_body(request, tokenizer, entries)
        if request.chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "logprobs": logprobs, "finish_reason": result.finish_reason})
        else:
            choices.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": result.finish_reason})
    return {"id": ident, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(len(request.prompt_ids), results)}


@dataclass(frozen=True)
class _NoContext:
    """The prompt's first token: a token string but no logprob."""

    token_id: int
    logprob: None = None
    top: tuple = ()


def chunk(request: CompletionRequest, ident: str, model: str, text: str | None,
          finish_reason: str | None = None, first: bool = False, index: int = 0,
          logprobs: dict | None = None, tokens: list[dict] | None = None) -> dict:
    """One stream chunk: new text, or (text None) the closing chunk with its finish reason;
    ``tokens`` (``include_draft`` only): the provenance entries of the tokens it completes."""
    if request.chat:
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", "content": ""}
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs,
                  "finish_reason": finish_reason}
    if request.include_draft:
        choice["tokens"] = tokens or []
    return {"id": ident, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(request: CompletionRequest, ident: str, model: str,
                results: list[GenerationResult]) -> dict:
    return {"id": ident, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(len(request.prompt_ids), results)}


def token_entry(token_id: int, from_draft: bool, drafted: int) -> dict:
    """One ``tokens`` entry of a chunk (``include_draft``; see the module docstring)."""
    return {"id": token_id, "from_draft": from_draft, "drafted": drafted}
