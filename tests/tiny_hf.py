"""Test helpers: a tiny random Gemma 3 model saved as a Hugging Face folder, and a byte tokenizer.

The folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) loads through
the real ``load_target`` path, so CLI tests run end to end in a second without the real model.
"""
from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

from safetensors.torch import save_file
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models

from mtpspec.config import tiny_config
from mtpspec.models.decoder import random_weights

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _tokenizer_json(vocab_size: int) -> str:
    """Byte-fallback BPE: special tokens, 256 byte tokens, printable ASCII, then filler pieces."""
    pieces = SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + [chr(c) for c in range(32, 127)]
    pieces += [f"w{i}" for i in range(vocab_size - len(pieces))]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True,
                                          unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(SPECIAL)
    return backend.to_str()


def write_tiny_hf_model(folder: Path, seed: int = 0, chat_template: bool = False,
                        **overrides) -> Path:
    """Save a tiny random Gemma 3 (``tiny_config(**overrides)``) with a byte tokenizer."""
    config = tiny_config(**overrides)
    folder.mkdir(parents=True, exist_ok=True)
    raw = {
        "model_type": "gemma3_text", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "sliding_window": config.sliding_window,
        "sliding_window_pattern": config.sliding_window_pattern,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta_global, "rope_local_base_freq": config.rope_theta_local,
        "eos_token_id": list(config.eos_token_ids), "bos_token_id": 2, "pad_token_id": 0,
    }
    (folder / "config.json").write_text(json.dumps(raw))
    save_file(random_weights(config, seed=seed), str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(_tokenizer_json(config.vocab_size))
    tok_config = {"bos_token": "<bos>", "eos_token": "<eos>"}
    if chat_template:
        tok_config["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return folder


def tiny_chat_target(root: Path):
    """``load_target`` of a tiny chat model (template included) in fp32, cached under ``root``."""
    import pytest

    from mtpspec.runtime import load_target

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTPSPEC_CACHE", str(root / "cache"))
        return load_target(write_tiny_hf_model(root / "chat", chat_template=True), "fp32")


class ByteTokenizer:
    """The smallest tokenizer the engine and the benchmark need: one id per byte (+3), bos = 2."""

    bos_id = 2

    def __init__(self, chat_template: str | None = None):
        self.chat_template = chat_template

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [3 + b for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<model>"

    def stream_decoder(self) -> "_ByteStream":
        return _ByteStream(self)


class _ByteStream:
    def __init__(self, tokenizer: ByteTokenizer):
        self.tokenizer, self.ids, self.done = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        out, self.done = text[len(self.done):], text
        return out

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        out, self.done = text[len(self.done):], text
        return out


@contextlib.contextmanager
def served(engine, name: str, config):
    """``mtpspec.server.start`` on a daemon thread for a test, shut down and closed afterwards."""
    from mtpspec.server import start

    srv = start(engine, name, config)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
