"""The web playground at ``/``: its files as served, then the page itself in a real Chromium.

The browser tests drive the page with Playwright (from PyPI) and the system's Chromium (Debian's
``chromium`` package, through ``executable_path``: Playwright downloads no browser), send a
prompt, wait for the stream to end and check the shown text against the API's greedy output and
the token marks against the API's ``include_draft`` stream. They skip, saying why, where
Playwright or Chromium is missing; install both with
``apt-get install -y chromium && .venv/bin/pip install playwright``.
A tiny random Gemma 3 with a chat template and prompt-lookup drafting stands in for the real
model, as in ``test_server``.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tomllib
import urllib.request
from pathlib import Path

import pytest

from mtpspec import playground
from mtpspec.engine import Engine, GenerateOptions
from mtpspec.proposers.ngram import NgramProposer
from mtpspec.server import ServeConfig

from tiny_hf import served, tiny_chat_target

MAX_LEN = 256
REPEATING = "alpha beta gamma alpha beta gamma alpha beta"
# its greedy continuation by the tiny model repeats ASCII pieces, so drafts are accepted and
# many chunks hold drafted tokens alone (random byte tokens elsewhere merge into shared chunks)
DRAFTY = "the cat the cat the cat"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_chat_target(tmp_path_factory.mktemp("playground"))


@pytest.fixture(scope="module")
def server(target):
    # policy=False: drafts follow the proposer alone (not the draft policy's timings), so the
    # page's run and the API's runs that it is checked against draft the same tokens
    engine = Engine(target.model, target.tokenizer, NgramProposer(), max_len=MAX_LEN, policy=False)
    # decode once first: a first build of the native kernels stays out of the browser's timeouts
    engine.generate([target.tokenizer.encode("warm up")], GenerateOptions(max_new_tokens=2))
    with served(engine, target.name, ServeConfig(port=0, max_batch_size=4, draft_k=4,
                                                 spec="ngram")) as srv:
        yield srv


def get(server, path: str):
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def post(server, path: str, body: dict):
    """The parsed body of a non-streamed request, or the chunks of a streamed one."""
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read().decode()
    if not body.get("stream"):
        return json.loads(raw)
    events = [e[len("data: "):] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_page_and_assets_are_served_without_outside_sources(server):
    status, headers, html = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert '<script src="/static/app.js"' in html and 'href="/static/style.css"' in html
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, headers, _ = get(server, f"/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind)
    assert get(server, "/static/../server.py")[0] == 404
    assert get(server, "/static/secret.txt")[0] == 404
    for name, data in playground.read_assets().items():
        text = data.decode()
        assert "http://" not in text and "https://" not in text, name  # no CDN, no fonts
    # shipped as package data: every asset matches a package-data pattern
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["mtpspec"]
    for name in playground.ASSETS:
        assert any(fnmatch.fnmatch(f"static/{name}", p) for p in patterns), name


def test_model_card_tells_the_page_what_runs(server, target):
    card = json.loads(get(server, "/v1/models")[2])["data"][0]
    assert card["speculative"] == {"method": "ngram", "draft_k": 4}
    assert card["chat_template"] is True


# --- in a real browser ---------------------------------------------------------------------------

def chromium_path() -> str | None:
    """A Chromium to drive: ``MTPSPEC_CHROMIUM``, else the first on PATH."""
    if os.environ.get("MTPSPEC_CHROMIUM"):
        return os.environ["MTPSPEC_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found (apt-get install -y chromium, or set MTPSPEC_CHROMIUM)")
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=path, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server, target):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-line').textContent.includes("
                           f"{json.dumps(target.name)})", timeout=TIMEOUT_MS)
    yield page
    context.close()
    assert not errors, errors


def text_of(page, selector: str) -> str:
    return page.eval_on_selector(selector, "element => element.textContent")


def drafted_text(chunks: list[dict], chat: bool) -> str:
    """The text of the stream chunks whose tokens are all accepted drafts (what the page marks)."""
    out = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            text = choice["delta"].get("content") if chat else choice["text"]
            if text and choice["tokens"] and all(t["from_draft"] for t in choice["tokens"]):
                out.append(text)
    return "".join(out)


def submit(page, mode: str, prompt: str, max_tokens: int, button: str, done: str) -> None:
    """Fill the form for a greedy request, press ``button`` and wait for the ``done`` selector."""
    page.select_option("#mode", mode)
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "0")
    page.click(button)
    page.wait_for_selector(done, timeout=TIMEOUT_MS)


def test_page_streams_the_greedy_text_with_drafts_marked(page, server, target):
    submit(page, "completion", DRAFTY, 40, "#generate", "#pane-spec[data-state=done]")

    request = {"prompt": DRAFTY, "max_tokens": 40, "temperature": 0}
    greedy = post(server, "/v1/completions", request)
    chunks = post(server, "/v1/completions", {**request, "stream": True, "stream_options": {
        "include_usage": True, "include_draft": True}})
    assert text_of(page, "#output-spec") == greedy["choices"][0]["text"]
    accepted = greedy["usage"]["draft_n_accepted"]
    assert accepted > 0
    assert page.get_attribute("#pane-spec", "data-accepted") == str(accepted)
    assert page.get_attribute("#pane-spec", "data-tokens") == str(
        greedy["usage"]["completion_tokens"])
    marked = page.eval_on_selector_all("#output-spec .tok.draft",
                                       "spans => spans.map(s => s.textContent).join('')")
    assert marked and marked == drafted_text(chunks, chat=False)
    assert page.locator("#output-spec .tok.bonus, #output-spec .tok.correction").count() > 0
    assert page.locator("#pane-spec .steps .step").count() > 0  # one bar per step
    assert "tok/s" in text_of(page, "#pane-spec .stats")


def test_side_by_side_runs_plain_and_speculative_and_compares(page, server, target):
    submit(page, "chat", REPEATING, 24, "#compare", "#verdict:not([hidden])")

    answer = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": REPEATING}], "max_tokens": 24,
        "temperature": 0})["choices"][0]["message"]["content"]
    assert text_of(page, "#output-plain") == text_of(page, "#output-spec") == answer
    assert page.get_attribute("#verdict", "data-identical") == "true"
    verdict = text_of(page, "#verdict")
    assert "identical" in verdict and verdict.count("tok/s") == 2
    assert page.get_attribute("#pane-plain", "data-accepted") == "0"
    assert page.locator("#output-plain .tok.draft").count() == 0
    # the conversation goes on from the answer
    assert answer in text_of(page, "#transcript")
