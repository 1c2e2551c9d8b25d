"""Packed models stored as data (``models/store.py``) and the one target-model interface.

A stored model reads back bit for bit (same logits in every packed format) without repacking;
anything that does not match what it must be (another source hash or format, a tampered header,
a misshapen or missing tensor) is refused with ``StoreMismatch`` and ``runtime`` rebuilds; the file
is safetensors with a JSON header, never a pickle. Every model class satisfies ``TargetModel``.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtpspec.config import tiny_config
from mtpspec.models.base import TargetModel
from mtpspec.models.decoder import DecoderModel, random_weights
from mtpspec.models.store import HEADER_KEY, StoreMismatch, load_packed, save_packed

LLAMA = dict(family="llama", norm_offset=0.0, sandwich_norms=False, qk_norm=False,
             mlp_activation="silu", scale_embeddings=False, tie_word_embeddings=False,
             qkv_bias=True, sliding_window_pattern=1, rope_scaling_local=True)


def _logits(model, ids):
    cache = model.new_cache(1, 64)
    logits, _ = model(ids, torch.arange(ids.shape[1])[None], cache, num_logits=None)
    return logits


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_stored_model_reads_back_bit_for_bit(fmt, tmp_path):
    config = tiny_config(**LLAMA)
    weights = random_weights(config, seed=3)
    model = DecoderModel(config, weights, fmt)
    path = tmp_path / "m.safetensors"
    save_packed(model, weights, path, "abc")
    assert path.read_bytes()[8:9] == b"{"  # safetensors: a length, then a JSON header
    again = load_packed(path, "abc", fmt)
    ids = torch.tensor([[5, 9, 200, 7, 7, 31]])
    assert torch.equal(_logits(model, ids), _logits(again, ids))
    assert again.config == config and not again.tied


def test_mismatches_are_refused(tmp_path):
    config = tiny_config(**LLAMA)
    weights = random_weights(config)
    path = tmp_path / "m.safetensors"
    save_packed(DecoderModel(config, weights, "int8"), weights, path, "abc")
    with pytest.raises(StoreMismatch, match="another source"):
        load_packed(path, "other", "int8")
    with pytest.raises(StoreMismatch, match="another source"):
        load_packed(path, "abc", "int4")
    tensors = load_file(str(path))
    header = json.loads(_metadata(path)[HEADER_KEY])
    bad = dict(tensors, **{"layers.0.qkv.packed": tensors["layers.0.qkv.packed"][:1].contiguous()})
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(StoreMismatch, match="wrong shape"):
        load_packed(tmp_path / "shape.safetensors", "abc", "int8")
    missing = {k: v for k, v in tensors.items() if not k.endswith("input_layernorm.weight")}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(StoreMismatch, match="missing"):
        load_packed(tmp_path / "missing.safetensors", "abc", "int8")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={HEADER_KEY: "{not json"})
    with pytest.raises(StoreMismatch, match="bad header"):
        load_packed(tmp_path / "bad.safetensors", "abc", "int8")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk pickle")
    with pytest.raises(StoreMismatch):
        load_packed(tmp_path / "junk.safetensors", "abc", "int8")


def _metadata(path):
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return json.loads(path.read_bytes()[8:8 + length])["__metadata__"]


def test_runtime_rebuilds_a_tampered_store(tmp_path, monkeypatch):
    from tiny_gemma4 import llama_like, save_with_tokenizer

    from mtpspec.runtime import load_target

    monkeypatch.setenv("MTPSPEC_CACHE", str(tmp_path / "cache"))
    folder = save_with_tokenizer(llama_like("llama"), tmp_path / "llama")
    first = load_target(folder, "int8", with_tokenizer=False)
    stored = next((tmp_path / "cache").rglob("model-int8.safetensors"))
    stored.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilding"):
        again = load_target(folder, "int8", with_tokenizer=False)
    ids = torch.tensor([[5, 9, 200, 7]])
    assert torch.equal(_logits(first.model, ids), _logits(again.model, ids))
    assert load_target(folder, "int8", with_tokenizer=False).model.weight_format == "int8"


def test_every_model_class_is_a_target_model():
    from tiny_gemma4 import llama_like

    from mtpspec.models.hf import HFModel

    config = tiny_config()
    assert isinstance(DecoderModel(config, random_weights(config), "fp32"), TargetModel)
    llama = tiny_config(**LLAMA)
    assert isinstance(DecoderModel(llama, random_weights(llama), "int8"), TargetModel)
    assert isinstance(HFModel(llama_like("llama")), TargetModel)
