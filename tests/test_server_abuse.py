"""The server against hostile and careless clients, and the API features clients rely on.

Each case of issue #16 on a tiny random Gemma 3: absurd seeds, deeply nested JSON, huge stop
strings, tiny temperatures, unimplemented fields, errors inside one request and inside the engine,
a dead engine thread, the API key, the queue cap, slow bodies, idle and half-closed connections,
and a concurrent mix of good and bad requests in which every good request still gets its solo
greedy output. Then what clients use: seeds that reproduce beside other requests, logprobs equal
on the plain and the speculative path, echo with prompt logprobs, n > 1, stop token ids.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mtpspec.engine import Engine, GenerateOptions
from mtpspec.proposers.ngram import NgramProposer
from mtpspec.sequence import StopMatcher
from mtpspec.server import ServeConfig

from tiny_hf import served, tiny_chat_target, write_tiny_hf_model

MAX_LEN = 256


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_chat_target(tmp_path_factory.mktemp("abuse"))


@contextlib.contextmanager
def serving(target, proposer=True, **config):
    engine = Engine(target.model, target.tokenizer, NgramProposer() if proposer else None,
                    max_len=MAX_LEN)
    settings = dict(port=0, max_batch_size=4, draft_k=4 if proposer else 0, watchdog_s=0.1)
    settings.update(config)
    with served(engine, target.name, ServeConfig(**settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(target):
    with serving(target, body_timeout_s=0.5, keep_alive_s=1.0, header_timeout_s=1.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain_server(target):
    with serving(target, proposer=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def solo(target):
    """Greedy text of a prompt decoded alone, without drafting."""
    engine = Engine(target.model, target.tokenizer, max_len=MAX_LEN)

    def run(text: str, max_tokens: int, ids: bool = False):
        options = GenerateOptions(max_new_tokens=max_tokens,
                                  stop_token_ids=tuple(target.tokenizer.eos_ids))
        result = engine.generate([target.tokenizer.encode(text)], options)[0]
        return result.token_ids if ids else result.text
    return run


def call(server, path: str, body, headers: dict | None = None, method: str = "POST",
         timeout: float = 60):
    """(status, headers, parsed JSON or text) of one request on a fresh connection."""
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                   **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw.decode()
    return response.status, response.headers, payload


def complete(server, **body) -> dict:
    status, _, payload = call(server, "/v1/completions", body)
    assert status == 200, payload
    return payload


def metric(server, name: str) -> float:
    _, _, text = call(server, "/metrics", None, method="GET")
    for line in text.splitlines():
        if line.startswith(f"mtpspec_{name} "):
            return float(line.split()[-1])
    raise KeyError(name)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def error_of(server, body, path="/v1/completions") -> tuple[int, dict]:
    status, _, payload = call(server, path, body)
    assert set(payload["error"]) == {"message", "type", "param", "code"}, payload
    return status, payload["error"]


# --- hostile fields -------------------------------------------------------------------------------

def test_huge_seeds_fold_and_the_server_serves_on(server, solo):
    for seed in (1 << 63, (1 << 64) - 1, -(1 << 63), 0):
        text = complete(server, prompt="hi", max_tokens=4, seed=seed)["choices"][0]["text"]
        assert isinstance(text, str)
    status, error = error_of(server, {"prompt": "hi", "max_tokens": 4, "seed": 1 << 64})
    assert status == 400 and error["param"] == "seed"
    status, error = error_of(server, b'{"prompt": "hi", "seed": 1' + b"0" * 5000 + b"}")
    assert status == 400
    assert complete(server, prompt="hi", max_tokens=6, temperature=0)["choices"][0]["text"] == \
        solo("hi", 6)


def test_deep_nesting_and_garbage_bodies_get_400(server):
    for body in (b"[" * 100_000, b"{" * 100_000, b'{"prompt": ' + b"[" * 50_000 + b"}",
                 b"\xff\xfe", b"null", b'"x"'):
        status, error = error_of(server, body)
        assert status == 400, body[:20]
    status, _, payload = call(server, "/health", None, method="GET")
    assert status == 200


def test_stop_strings_are_capped_and_matched_in_linear_time(server, solo):
    status, error = error_of(server, {"prompt": "hi", "max_tokens": 16, "stop": "x" * 200_000})
    assert status == 400 and error["param"] == "stop"
    status, error = error_of(server, {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]})
    assert status == 400 and error["param"] == "stop"
    start_time = time.monotonic()  # the longest allowed stop strings cost nothing noticeable
    stops = ["ab" * 512, "a" * 1023 + "b", "z" * 1024, "q" * 1024]
    text = complete(server, prompt="alpha", max_tokens=32, temperature=0, stop=stops)
    assert text["choices"][0]["text"] == solo("alpha", 32)
    assert time.monotonic() - start_time < 5.0


def test_stop_matcher_equals_find():
    rng = random.Random(0)
    for _ in range(2000):
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 6)))
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 14)))
        matcher, hit = StopMatcher(stop), None
        for i, char in enumerate(text):
            if matcher.feed(char):
                hit = i
                break
        want = text.find(stop)
        assert hit == (want + len(stop) - 1 if want >= 0 else None)
        if hit is None:
            held = max((n for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])),
                       default=0)
            assert matcher.state == held


def test_tiny_temperature_is_greedy(server, solo):
    for temperature in (1e-39, 1e-6, 0):
        got = complete(server, prompt="gamma delta", max_tokens=12, temperature=temperature)
        assert got["choices"][0]["text"] == solo("gamma delta", 12)


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_object"}), ("min_p", 0.1), ("repetition_penalty", 1.1),
    ("frequency_penalty", 0.5), ("logit_bias", {"5": 10}), ("best_of", 3), ("suffix", "x"),
    ("guided_json", {}),
])
def test_unimplemented_fields_are_refused_by_name(server, field, value):
    status, error = error_of(server, {"prompt": "hi", field: value})
    assert status == 400 and error["param"] == field and field in error["message"]


def test_neutral_values_and_common_fields_are_accepted(server):
    got = complete(server, prompt="hi", max_tokens=3, frequency_penalty=0, presence_penalty=0.0,
                   logit_bias={}, response_format={"type": "text"}, user="u-1", best_of=1)
    assert got["usage"]["completion_tokens"] >= 1
    status, _, payload = call(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3,
        "user": "u-2", "temperature": 0})
    assert status == 200 and payload["usage"]["completion_tokens"] <= 3
    status, error = error_of(server, {"messages": [{"role": "user", "content": "hi"}],
                                      "min_p": 0.2}, "/v1/chat/completions")
    assert status == 400 and error["param"] == "min_p"


@pytest.mark.parametrize("body, param", [
    ({"prompt": [1, 99999]}, "prompt"), ({"prompt": [-1, 5]}, "prompt"),
    ({"prompt": [True, 5]}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"), ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "stop_token_ids": [100000]}, "stop_token_ids"),
    ({"prompt": "hi", "n": 0}, "n"),
])
def test_fields_are_range_checked(server, body, param):
    status, error = error_of(server, json.dumps(body, allow_nan=True).encode())
    assert status == 400 and error["param"] == param


# --- failures stay with their request -------------------------------------------------------------

def test_an_error_in_one_request_fails_it_alone(server, solo, monkeypatch):
    session = server.scheduler.session
    verify_group = session._verify_group

    def failing(group, rows, *args):
        if group != "greedy" and session.live[rows[0]].options.sampling.temperature == 0.77:
            raise RuntimeError("poisoned sampling params")
        return verify_group(group, rows, *args)
    monkeypatch.setattr(session, "_verify_group", failing)
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(call, server, "/v1/completions",
                          {"prompt": "eps zeta", "max_tokens": 40, "temperature": 0.77})
        good = pool.submit(complete, server, prompt="beta beta", max_tokens=40, temperature=0)
        status, _, payload = bad.result()
        assert status == 500 and payload["error"]["code"] == "engine_error"
        assert "poisoned" in payload["error"]["message"]
        assert good.result()["choices"][0]["text"] == solo("beta beta", 40)


def test_an_engine_error_fails_the_batch_and_the_engine_serves_on(server, solo, monkeypatch):
    session = server.scheduler.session
    decode, armed = session._decode, [True]

    def failing(events):
        if armed[0]:
            armed[0] = False
            raise RuntimeError("the shared pass broke")
        return decode(events)
    monkeypatch.setattr(session, "_decode", failing)
    status, _, payload = call(server, "/v1/completions", {"prompt": "hi", "max_tokens": 8})
    assert status == 500 and "shared pass" in payload["error"]["message"]
    assert complete(server, prompt="hi", max_tokens=8, temperature=0)["choices"][0]["text"] == \
        solo("hi", 8)


class _Fatal(BaseException):
    """Escapes every ``except Exception``: kills the engine thread."""


def test_a_dead_engine_thread_shows_in_health_and_is_restarted(target, solo, monkeypatch):
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # keep the log quiet
    with serving(target, watchdog_s=0.3) as srv:
        session = srv.scheduler.session
        step, armed = session.step, [True]

        def fatal():
            if armed[0]:
                armed[0] = False
                raise _Fatal()
            return step()
        monkeypatch.setattr(session, "step", fatal)
        health = lambda: call(srv, "/health", None, method="GET")  # noqa: E731
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(call, srv, "/v1/completions", {"prompt": "hi", "max_tokens": 8})
            assert wait_for(lambda: health()[0] == 503, 5)  # dead for >= one watchdog period
            status, _, payload = job.result()
        assert status == 500 and payload["error"]["code"] == "engine_error"  # failed on restart
        assert wait_for(lambda: health()[0] == 200, 5)
        assert srv.scheduler.restarts == 1 and metric(srv, "engine_restarts_total") == 1
        assert complete(srv, prompt="hi", max_tokens=8, temperature=0)["choices"][0]["text"] == \
            solo("hi", 8)


# --- access and limits ----------------------------------------------------------------------------

def test_api_key(target, monkeypatch):
    with serving(target, api_key="sekret") as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            status, _, payload = call(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2},
                                      headers)
            assert status == 401 and payload["error"]["code"] == "invalid_api_key"
            assert call(srv, "/v1/models", None, headers, method="GET")[0] == 401
        assert call(srv, "/health", None, method="GET")[0] == 200
        status, _, payload = call(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2},
                                  {"Authorization": "Bearer sekret"})
        assert status == 200
    assert ServeConfig().host == "127.0.0.1"


def test_queue_cap_answers_503_with_retry_after(target, monkeypatch):
    with serving(target, max_batch_size=1, max_waiting=0) as srv:
        session = srv.scheduler.session
        step = session.step
        monkeypatch.setattr(session, "step", lambda: (time.sleep(0.02), step())[1])
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(call, srv, "/v1/completions",
                               {"prompt": "hi", "max_tokens": 60, "temperature": 0})
            assert wait_for(lambda: srv.scheduler.running == 1)
            status, headers, payload = call(srv, "/v1/completions", {"prompt": "hi"})
            assert status == 503 and headers["Retry-After"] == "1"
            assert payload["error"]["code"] == "server_busy"
            assert busy.result()[0] == 200


def test_body_limits(server):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(64 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == \
        "request_too_large"
    conn.close()
    # chunked, no length: counted as it arrives
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("POST", "/v1/completions", body=iter([b"x" * (1 << 20)] * 5),
                 encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    assert response.status == 413
    conn.close()


def test_slow_body_times_out(server):
    with socket.create_connection(server.server_address, timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        start_time = time.monotonic()
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start_time < 5
    assert call(server, "/health", None, method="GET")[0] == 200


def recv_health(sock) -> bytes:
    """One whole /health answer from a raw socket."""
    data = b""
    while b'"ok"}' not in data:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    return data


def test_idle_keep_alive_connections_are_closed(server):
    with socket.create_connection(server.server_address, timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_health(sock).startswith(b"HTTP/1.1 200")
        start_time = time.monotonic()
        assert sock.recv(65536) == b""  # the server hung up on the idle connection
        assert time.monotonic() - start_time < 5
    for first in (b"", b"GET /hea"):  # silent, then trickling headers (slowloris)
        with socket.create_connection(server.server_address, timeout=10) as sock:
            start_time = time.monotonic()
            sock.sendall(first)
            assert sock.recv(65536) == b"" and time.monotonic() - start_time < 5
    with socket.create_connection(server.server_address, timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # a request, then a trickle
        assert recv_health(sock).startswith(b"HTTP/1.1 200")
        start_time = time.monotonic()
        for _ in range(3):
            sock.sendall(b"G")
            time.sleep(0.3)
        assert sock.recv(65536) == b"" and time.monotonic() - start_time < 5


def test_half_closed_connections_free_their_rows(server, solo, monkeypatch):
    session = server.scheduler.session
    step = session.step
    monkeypatch.setattr(session, "step", lambda: (time.sleep(0.01), step())[1])
    body = json.dumps({"prompt": "alpha", "max_tokens": 150, "temperature": 0}).encode()
    socks = []
    for _ in range(3):
        sock = socket.create_connection(server.server_address, timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        sock.shutdown(socket.SHUT_WR)
        socks.append(sock)
    assert wait_for(lambda: server.scheduler.running == 0 and server.scheduler.pending == 0)
    for sock in socks:
        sock.close()
    assert complete(server, prompt="hi", max_tokens=5, temperature=0)["choices"][0]["text"] == \
        solo("hi", 5)


def test_a_client_that_stops_reading_is_cut_off(target):
    with serving(target, write_timeout_s=0.5) as srv:
        srv.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted ones inherit
        body = json.dumps({"prompt": "hi", "max_tokens": 200, "temperature": 1.0, "n": 4,
                           "logprobs": 20, "stream": True}).encode()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(20)
            sock.connect(srv.server_address)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                         b"\r\n%s" % (len(body), body))
            time.sleep(2.0)  # read nothing for four write timeouts
            data = b""
            while part := sock.recv(65536):
                data += part
        assert data.startswith(b"HTTP/1.1 200") and b"[DONE]" not in data
        assert wait_for(lambda: srv.scheduler.pending == 0)
        assert call(srv, "/health", None, method="GET")[0] == 200


def test_health_answers_fast_while_generations_run(server):
    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(call, server, "/v1/completions",
                            {"prompt": f"w{i} alpha", "max_tokens": 120, "temperature": 0.9,
                             "seed": i}) for i in range(8)]
        assert wait_for(lambda: server.scheduler.running >= 4)
        slowest = 0.0
        for _ in range(10):
            start_time = time.monotonic()
            assert call(server, "/health", None, method="GET")[0] == 200
            slowest = max(slowest, time.monotonic() - start_time)
        busy = server.scheduler.running
        assert all(job.result()[0] == 200 for job in jobs)
    assert busy >= 1 and slowest < 0.1, slowest


def test_a_mix_of_good_and_bad_requests(server, solo):
    bad_bodies = [b"[" * 20000, {"prompt": "hi", "seed": 1 << 70}, {"prompt": "hi", "min_p": 1},
                  {"prompt": [99999]}, {"prompt": "hi", "stop": "s" * 5000},
                  {"prompt": "hi", "temperature": -1}, {"messages": []}]

    def one(job: int):
        if job % 3 == 2:
            body = bad_bodies[job % len(bad_bodies)]
            status, _, payload = call(server, "/v1/completions", body)
            return status in (400, 404) and "error" in payload
        text, tokens = f"w{job % 7} beta gamma", 5 + job % 20
        got = complete(server, prompt=text, max_tokens=tokens, temperature=0)
        return got["choices"][0]["text"] == solo(text, tokens)

    with ThreadPoolExecutor(12) as pool:
        assert all(pool.map(one, range(60)))


# --- what clients use -----------------------------------------------------------------------------

def test_seeded_sampling_is_the_same_alone_and_in_a_batch(server):
    body = {"prompt": "delta eps", "max_tokens": 40, "temperature": 0.8, "seed": 1234}
    alone = complete(server, **body)["choices"][0]["text"]
    assert complete(server, **body)["choices"][0]["text"] == alone
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(complete, server, prompt=f"w{i} zeta", max_tokens=60,
                              temperature=[0, 0.7, 1.0][i]) for i in range(3)]
        beside = pool.submit(complete, server, **body)
        assert beside.result()["choices"][0]["text"] == alone
        for other in others:
            other.result()
    assert metric(server, "batch_rows_total") > metric(server, "batch_steps_total")


def test_logprobs_under_speculation_equal_the_plain_path(server, plain_server):
    body = {"prompt": "alpha beta alpha beta", "max_tokens": 24, "temperature": 0, "logprobs": 3}
    spec, plain = complete(server, **body), complete(plain_server, **body)
    assert spec["usage"]["draft_n_accepted"] > 0  # speculation really ran
    a, b = spec["choices"][0]["logprobs"], plain["choices"][0]["logprobs"]
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == spec["usage"]["completion_tokens"]
    assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-4)
    for top_a, top_b in zip(a["top_logprobs"], b["top_logprobs"]):
        assert 1 <= len(top_a) <= 3 and top_a == pytest.approx(top_b, abs=1e-4)
    assert all(lp <= 0 for lp in a["token_logprobs"])
    # sampled, and the chat shape
    chat = {"messages": [{"role": "user", "content": "zeta"}], "max_tokens": 12,
            "temperature": 0.9, "seed": 5, "logprobs": True, "top_logprobs": 2}
    got = [call(srv, "/v1/chat/completions", chat)[2]["choices"][0] for srv in (server,
                                                                                plain_server)]
    assert got[0]["message"] == got[1]["message"]
    entries = [[(e["token"], e["logprob"]) for e in c["logprobs"]["content"]] for c in got]
    assert [t for t, _ in entries[0]] == [t for t, _ in entries[1]]
    assert [lp for _, lp in entries[0]] == pytest.approx([lp for _, lp in entries[1]], abs=1e-4)
    assert all(len(e["top_logprobs"]) == 2 for e in got[0]["logprobs"]["content"])
    for entry in got[0]["logprobs"]["content"]:  # a byte-fallback token is its one byte
        assert entry["bytes"] and (len(entry["bytes"]) == 1 or entry["token"] != "\ufffd")


def test_echo_gives_prompt_logprobs_that_match_generation(server, target, solo):
    first = complete(server, prompt="gamma zeta", max_tokens=6, temperature=0, logprobs=1)
    generated = first["choices"][0]["logprobs"]
    prompt_ids = target.tokenizer.encode("gamma zeta")
    ids = prompt_ids + solo("gamma zeta", 6, ids=True)
    scored = complete(server, prompt=ids, max_tokens=1, temperature=0, logprobs=0, echo=True)
    logprobs = scored["choices"][0]["logprobs"]
    assert scored["choices"][0]["text"].startswith(target.tokenizer.decode(ids))
    assert logprobs["token_logprobs"][0] is None and len(logprobs["tokens"]) == len(ids) + 1
    tail = logprobs["token_logprobs"][len(prompt_ids):len(ids)]  # scored = generated
    assert tail == pytest.approx(generated["token_logprobs"], abs=1e-4)
    assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])


def test_n_choices_and_stop_token_ids(server, target, solo):
    body = {"prompt": "eps eps", "max_tokens": 10, "temperature": 0.9, "seed": 42}
    many = complete(server, n=3, **body)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert many["choices"][0]["text"] == complete(server, **body)["choices"][0]["text"]
    assert len({c["text"] for c in many["choices"]}) > 1  # distinct seeds, distinct samples
    stop_id = solo("beta", 12, ids=True)[3]
    stopped = complete(server, prompt="beta", max_tokens=12, temperature=0,
                       stop_token_ids=[stop_id])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert solo("beta", 12).startswith(stopped["choices"][0]["text"])
    assert stopped["usage"]["completion_tokens"] <= 3
    # streamed n > 1: each choice's text arrives under its own index
    status, _, raw = call(server, "/v1/completions", {**body, "n": 2, "stream": True})
    events = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
    texts = ["".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i)
             for i in range(2)]
    assert texts == [c["text"] for c in many["choices"][:2]]


def test_cli_serve_takes_the_key_from_the_flag_or_the_environment(tmp_path, monkeypatch, capsys):
    import mtpspec.server as server_module
    from mtpspec.cli import main

    configs = []

    class Idle:
        url = "http://127.0.0.1:0"

        def serve_forever(self) -> None:
            pass

        def server_close(self) -> None:
            pass

    monkeypatch.setattr(server_module, "start",
                        lambda engine, name, config: configs.append(config) or Idle())
    monkeypatch.setenv("MTPSPEC_CACHE", str(tmp_path / "cache"))
    argv = ["serve", "--model", str(write_tiny_hf_model(tmp_path / "m")), "--spec", "none",
            "--weights", "fp32"]
    monkeypatch.setenv("MTPSPEC_API_KEY", "from-env")
    assert main(argv) == 0 and main(argv + ["--api-key", "from-flag"]) == 0
    assert [c.api_key for c in configs] == ["from-env", "from-flag"]
    assert configs[0].host == "127.0.0.1"
    monkeypatch.setenv("MTPSPEC_API_KEY", " ")
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "API key" in capsys.readouterr().err
