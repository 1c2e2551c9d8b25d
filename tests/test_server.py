"""The OpenAI-compatible server, driven by the real ``openai`` client on loopback.

A tiny random Gemma 3 saved as a Hugging Face folder (with a chat template) stands in for the real
model. Checked: every endpoint and the SSE stream format, greedy outputs equal to the model's solo
greedy output (alone and under a 16-client load), seeded sampling, OpenAI-style 4xx errors after
which the server keeps serving, and that a client that disconnects frees its batch row.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from mtpspec.engine import Engine, GenerateOptions
from mtpspec.openai_api import APIError, ServedModel, parse_request
from mtpspec.proposers.ngram import NgramProposer
from mtpspec.server import ServeConfig
from mtpspec.tokenizer import load_tokenizer_hf

from tiny_hf import served, tiny_chat_target, write_tiny_hf_model

MAX_LEN = 256


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_chat_target(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(target):
    engine = Engine(target.model, target.tokenizer, NgramProposer(), max_len=MAX_LEN)
    with served(engine, target.name, ServeConfig(port=0, max_batch_size=4, draft_k=4,
                                                 spec="ngram")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def solo(target):
    """Greedy text and token count of a prompt decoded alone, without drafting (cached)."""
    engine = Engine(target.model, target.tokenizer, max_len=MAX_LEN)
    memo = {}

    def run(ids: list[int], max_tokens: int, stop: tuple[str, ...] = ()):
        key = (tuple(ids), max_tokens, stop)
        if key not in memo:
            options = GenerateOptions(max_new_tokens=max_tokens, stop=stop,
                                      stop_token_ids=tuple(target.tokenizer.eos_ids))
            result = engine.generate([ids], options)[0]
            memo[key] = (result.text, len(result.token_ids), result.finish_reason)
        return memo[key]
    return run


def prompt_text(i: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    return " ".join(words[(i + j) % len(words)] for j in range(3 + i % 5)) * (1 + i % 3)


def raw_post(server, path: str, body: bytes, headers: dict | None = None):
    """(status, parsed JSON body) of a POST with an arbitrary body."""
    request = urllib.request.Request(server.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(server, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def metric(server, name: str) -> float:
    _, text = get(server, "/metrics")
    for line in text.splitlines():
        if line.startswith(f"mtpspec_{name} "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_models_health_metrics(server, client, target):
    assert [m.id for m in client.models.list().data] == [target.name]
    status, text = get(server, "/health")
    assert (status, json.loads(text)) == (200, {"status": "ok"})
    status, text = get(server, "/metrics")
    assert status == 200
    for name in ("requests_total", "draft_tokens_proposed_total", "draft_tokens_accepted_total",
                 "acceptance_rate_at_position", "mean_acceptance_length", "requests_running",
                 "time_to_first_token_seconds", "time_per_output_token_seconds",
                 "request_queue_time_seconds", "e2e_request_latency_seconds"):
        assert f"# TYPE mtpspec_{name} " in text


def test_completion_equals_solo_greedy_with_usage(client, target, solo):
    text = prompt_text(3)
    response = client.completions.create(model=target.name, prompt=text, max_tokens=24,
                                         temperature=0)
    want_text, want_tokens, want_finish = solo(target.tokenizer.encode(text), 24)
    choice = response.choices[0]
    assert (choice.text, choice.finish_reason) == (want_text, want_finish)
    usage = response.usage
    assert usage.completion_tokens == want_tokens
    assert usage.prompt_tokens == len(target.tokenizer.encode(text))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.draft_n >= usage.draft_n_accepted >= 0
    assert usage.mean_acceptance_length >= 1.0


def test_streams_end_with_done_and_usage(server, client, target):
    messages = [{"role": "user", "content": "alpha beta alpha beta"}]
    whole = client.chat.completions.create(model=target.name, messages=messages, max_tokens=16,
                                           temperature=0)
    chunks = list(client.chat.completions.create(
        model=target.name, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens
    # the raw wire format: SSE events, the last one [DONE]
    body = json.dumps({"prompt": "gamma gamma", "max_tokens": 8, "temperature": 0,
                       "stream": True}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_seeded_sampling_is_reproducible(client, target):
    def once():
        return client.completions.create(model=target.name, prompt="delta eps", max_tokens=12,
                                         temperature=0.9, top_p=0.95, seed=7, extra_body={"top_k": 50},
                                         stop=["zz"]).choices[0].text
    assert once() == once()


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"max_tokens": 5}', 400, "prompt"),
    (b'{"prompt": "hi", "temperature": 3}', 400, "temperature"),
    (b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "hi", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "hi", "top_k": -1}', 400, "top_k"),
    (b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"prompt": "hi", "n": 2, "temperature": 0}', 400, "n"),
    (b'{"prompt": "hi", "n": 9}', 400, "n"),
    (b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"prompt": "hi", "stream": "yes"}', 400, "stream"),
    (b'{"prompt": "hi", "logprobs": 21}', 400, "logprobs"),
    (b'{"prompt": ["a", "b"]}', 400, "prompt"),
    (b'{"prompt": [1, 99999]}', 400, "prompt"),
    (b'{"prompt": "hi", "model": "gpt-4o"}', 404, "model"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    got, payload = raw_post(server, "/v1/completions", body)
    assert got == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_chat_and_routing_errors(server, client, target):
    for messages, param in (([], "messages"), ([{"role": "wizard", "content": "x"}], "messages[0].role"),
                            ([{"role": "user", "content": 5}], "messages[0].content")):
        got, payload = raw_post(server, "/v1/chat/completions", json.dumps(
            {"messages": messages}).encode())
        assert (got, payload["error"]["param"]) == (400, param)
    got, payload = raw_post(server, "/v1/chat/completions", b'{"model": "x"}')
    assert got == 404  # the model is checked first
    got, payload = raw_post(server, "/v1/completions", b"{}",
                            {"Content-Length": str(64 << 20)})
    assert got == 413 and payload["error"]["code"] == "request_too_large"
    assert get(server, "/v1/nowhere")[0] == 404
    assert get(server, "/v1/completions")[0] == 405
    with pytest.raises(openai.BadRequestError) as info:  # over-long prompt: names the lengths
        client.completions.create(model=target.name, prompt="x" * 400, max_tokens=4)
    message = info.value.body["message"]
    assert info.value.body["code"] == "context_length_exceeded" and "256" in message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x")
    # still serving
    assert client.completions.create(model=target.name, prompt="ok", max_tokens=3,
                                     temperature=0).usage.completion_tokens >= 1


def test_chat_without_template_is_a_clear_400(tmp_path):
    tokenizer = load_tokenizer_hf(write_tiny_hf_model(tmp_path / "base"))  # a base model
    model = ServedModel(name="base", tokenizer=tokenizer, context=64,
                        max_new_tokens_for=lambda n: 64 - n, draft_k=0)
    with pytest.raises(APIError) as info:
        parse_request({"messages": [{"role": "user", "content": "hi"}]}, True, model)
    assert info.value.status == 400 and info.value.code == "no_chat_template"
    assert "/v1/completions" in info.value.message
    assert parse_request({"prompt": "hi"}, False, model).prompt_ids == tokenizer.encode("hi")


def _slow_steps(server, monkeypatch, delay=0.02):
    session = server.scheduler.session
    step = session.step

    def slow():
        time.sleep(delay)
        return step()
    monkeypatch.setattr(session, "step", slow)


def _wait_for(predicate, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_frees_the_row(server, client, target, monkeypatch):
    _slow_steps(server, monkeypatch)
    cancelled = metric(server, "sequences_cancelled_total")
    # mid-stream: read a few chunks, then drop the connection
    stream = client.completions.create(model=target.name, prompt=prompt_text(0), max_tokens=150,
                                       temperature=0, stream=True)  # runs to its length alone
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    assert _wait_for(lambda: metric(server, "sequences_cancelled_total") == cancelled + 1)
    assert _wait_for(lambda: metric(server, "requests_running") == 0)
    # not streaming: send the request and hang up without reading the answer
    body = json.dumps({"prompt": prompt_text(1), "max_tokens": 150, "temperature": 0}).encode()
    with socket.create_connection(server.server_address[:2]) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert _wait_for(lambda: metric(server, "requests_running") >= 1)
    assert _wait_for(lambda: metric(server, "sequences_cancelled_total") == cancelled + 2)
    assert _wait_for(lambda: metric(server, "requests_running") == 0)
    assert not server.scheduler.session.live


def test_load_16_clients_no_errors_no_mixups(server, target, solo):
    """16 clients x 10 requests, mixed endpoints and streaming; every output is its solo greedy."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)

    def one(job: int):
        i = job % 23
        text, max_tokens = prompt_text(i), 6 + (job * 7) % 27
        if job % 2:
            response = client.completions.create(model=target.name, prompt=text, temperature=0,
                                                 max_tokens=max_tokens, stream=job % 4 == 1)
            got = (response.choices[0].text if job % 4 == 3
                   else "".join(c.choices[0].text for c in response))
        else:
            chunks = client.completions.create(model=target.name, prompt=[text], temperature=0,
                                               max_tokens=max_tokens, stream=True,
                                               stream_options={"include_usage": True})
            chunks = list(chunks)
            got = "".join(c.choices[0].text for c in chunks if c.choices)
            assert chunks[-1].usage.prompt_tokens == len(target.tokenizer.encode(text))
        return got, solo(target.tokenizer.encode(text), max_tokens)[0]

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, range(160)))
    mismatches = [job for job, (got, want) in enumerate(outcomes) if got != want]
    assert not mismatches
    assert metric(server, "requests_running") == 0
    assert metric(server, "batch_rows_total") > metric(server, "batch_steps_total")  # batched


def sse_chunks(server, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed request, read off the wire (without the final [DONE])."""
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def steps_of(entries: list[dict]) -> list[list[dict]]:
    """Token entries grouped by verification step: accepted drafts, then the target's token."""
    steps, current = [], []
    for entry in entries:
        current.append(entry)
        if not entry["from_draft"]:
            steps.append(current)
            current = []
    assert not current, "a step ends with the target's token"
    return steps


REPEATING = "alpha beta gamma alpha beta gamma alpha beta"


def test_include_draft_marks_every_token(server, target):
    """``stream_options.include_draft``: one entry per token, in order, the greedy tokens; drafts
    and steps agree with usage; without it the chunks keep OpenAI's shape."""
    ids = target.tokenizer.encode(REPEATING)
    options = GenerateOptions(max_new_tokens=40, stop_token_ids=tuple(target.tokenizer.eos_ids))
    plain = Engine(target.model, target.tokenizer, max_len=MAX_LEN).generate([ids], options)[0]
    body = {"prompt": REPEATING, "max_tokens": 40, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "include_draft": True}}
    chunks = sse_chunks(server, "/v1/completions", body)
    usage = chunks[-1]["usage"]
    choices = [c["choices"][0] for c in chunks[:-1]]
    entries = [entry for choice in choices for entry in choice["tokens"]]
    assert "".join(choice["text"] for choice in choices) == plain.text
    assert [e["id"] for e in entries] == plain.token_ids
    # which tokens came from drafts depends on the draft policy's timings, so the flags are
    # checked against the server's own counters and step structure, not against another run
    assert choices[-1]["finish_reason"] == "length"  # so every accepted draft was emitted
    accepted = sum(e["from_draft"] for e in entries)
    assert accepted == usage["draft_n_accepted"] > 0
    steps = steps_of(entries)
    assert steps[0] == [{"id": plain.token_ids[0], "from_draft": False, "drafted": 0}]  # prefill
    for step in steps:
        assert len({e["drafted"] for e in step}) == 1 and len(step) - 1 <= step[0]["drafted"]
    assert sum(step[0]["drafted"] for step in steps) == usage["draft_n"]
    # chat streams carry them too (the role chunk has none)
    chat = sse_chunks(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": REPEATING}], "max_tokens": 12, "temperature": 0,
        "stream": True, "stream_options": {"include_draft": True}})
    assert chat[0]["choices"][0]["tokens"] == []
    assert sum(len(c["choices"][0]["tokens"]) for c in chat) >= 1
    # opt-in only: a plain stream has no such field
    body["stream_options"] = {"include_usage": True}
    assert all("tokens" not in choice for c in sse_chunks(server, "/v1/completions", body)
               for choice in c["choices"])


def test_draft_k_zero_decodes_plainly(server, client, target):
    """The ``draft_k`` extension: 0 gives the same greedy text with no drafting at all."""
    speculative = client.completions.create(model=target.name, prompt=REPEATING, max_tokens=40,
                                            temperature=0)
    plain = client.completions.create(model=target.name, prompt=REPEATING, max_tokens=40,
                                      temperature=0, extra_body={"draft_k": 0})
    assert plain.choices[0].text == speculative.choices[0].text
    assert speculative.usage.draft_n > 0
    assert (plain.usage.draft_n, plain.usage.mean_acceptance_length) == (0, 1.0)
    chunks = sse_chunks(server, "/v1/completions", {
        "prompt": REPEATING, "max_tokens": 40, "temperature": 0, "draft_k": 0, "stream": True,
        "stream_options": {"include_draft": True}})
    entries = [e for c in chunks for e in c["choices"][0]["tokens"]]
    assert len(entries) == 40 and not any(e["from_draft"] or e["drafted"] for e in entries)
    shorter = client.completions.create(model=target.name, prompt=REPEATING, max_tokens=40,
                                        temperature=0, extra_body={"draft_k": 1})
    assert shorter.choices[0].text == speculative.choices[0].text
    assert shorter.usage.draft_n <= shorter.usage.completion_tokens
    chat = client.chat.completions.create(model=target.name, temperature=0, max_tokens=8,
                                          messages=[{"role": "user", "content": "hi"}],
                                          extra_body={"draft_k": 0})
    assert chat.usage.draft_n == 0
    for value in (5, -1, "2"):  # this server drafts at most 4
        got, payload = raw_post(server, "/v1/completions", json.dumps(
            {"prompt": "hi", "draft_k": value}).encode())
        assert (got, payload["error"]["param"]) == (400, "draft_k"), payload
