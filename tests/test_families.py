"""Parity of the native decoder with transformers for every family, from HF folders and GGUFs.

For tiny random models of each family (``tiny_families``: Llama plain and with llama3 rope
scaling, Mistral with an 8-token window, Qwen2 with QKV bias and linear rope scaling, Qwen3 with
QK-norm, Gemma 2 with soft-caps, a query scale and alternating sliding layers, Gemma 3 with its
sliding pattern and linear scaling of global layers), each feature shown to change transformers'
logits, loaded natively:

- logits of a prefill, of one-token decode steps, of a verification block written after a prefix
  (also over a rolled-back block) and of a ragged batch match transformers' fp32 eager logits;
- greedy continuations of 32 tokens equal transformers' ``generate``, plain, with n-gram
  speculation and in a batch; in int8, int4 and bf16, speculation equals plain decoding;
- an edited ``config.json`` beside the same weights is not served the model packed under the old
  one; Qwen2/3 sliding layers named by ``layer_types`` match, and options the native model lacks
  (Qwen sliding windows without ``layer_types``, yarn, per-layer kv heads) point to
  ``--backend hf``; Gemma 3 with a final soft-cap or an untied head still matches; transformers 4.x config layouts read the same;
- the same weights written as a GGUF (llama.cpp's conventions: Gemma norms as ``1 + w``, Llama
  q/k rows interleaved, Llama 3.1 rope scaling as a divisor table, Gemma 2 27B's query scale)
  load natively with the folder's config and float32 tensors, the same logits and greedy tokens,
  and a working tokenizer;
- every supported block type loads to exactly what ``gguf.quants.dequantize`` and decoders
  written here from the block layouts make of its bytes (random blocks, and real quantizer output
  sliced from the embedded SmolLM2 and Gemma 3 GGUFs), and a model of such tensors matches
  transformers on those decoded weights;
- an unsupported architecture or block type, and truncated or corrupt files, are one-line
  ``ModelLoadError``/``GGUFError``s, never crashes.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from mtpspec.engine import Engine, GenerateOptions  # noqa: E402
from mtpspec.families import config_from_hf  # noqa: E402
from mtpspec.gguf_file import SUPPORTED_TENSOR_TYPES, GGUFError, read_gguf_tensors  # noqa: E402
from mtpspec.loading import ModelLoadError, load_weights  # noqa: E402
from mtpspec.models.decoder import DecoderModel  # noqa: E402
from mtpspec.proposers.ngram import NgramProposer  # noqa: E402
from mtpspec.runtime import load_target  # noqa: E402

from tiny_families import (CASES, GGUF_ARCH, LLAMA3_ROPE, WINDOW, build,  # noqa: E402
                           decode_blocks, family_config, family_model, gguf_name, gguf_reference,
                           gguf_table, gguf_tensor_table, interleave_rotary_rows,
                           llama3_rope_divisors, random_k_quant, write_gguf)
from tiny_gemma4 import hf_greedy, save_with_tokenizer  # noqa: E402

NEW = 32
RTOL = 1e-4  # max |native - transformers| <= RTOL * max(1, max |transformers logit|)
REPEATS = [2, 10, 20, 30, 40, 10, 20, 30, 40, 10, 20, 30, 7, 8, 9]  # n-gram lookup drafts here
SHORT = [2, 5, 6, 7, 300, 6, 7]


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Packed models and dequantized GGUFs go to a cache of this module's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTPSPEC_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory, private_cache):
    """One family: its transformers model, HF folder and native fp32 target (each case its own
    seed, so no two folders hold the same weights)."""
    name = request.param
    model = family_model(name, seed=CASES.index(name))
    folder = save_with_tokenizer(model, tmp_path_factory.mktemp(name))
    target = load_target(folder, "fp32", with_tokenizer=False)
    return SimpleNamespace(name=name, model=model, folder=folder, target=target,
                           tmp=tmp_path_factory.mktemp(name + "-files"))


def random_tokens(count: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(3, 512, (count - 1,), generator=gen).tolist()


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    """transformers' logits [T, V] for every position of ``tokens`` (one causal pass)."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def assert_close(native: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    scale = max(1.0, reference.abs().max().item())
    err = (native - reference).abs().max().item()
    assert err <= RTOL * scale, f"{what}: max |diff| {err:.3g} for logits up to {scale:.3g}"


def options(**overrides) -> GenerateOptions:
    return GenerateOptions(**{"max_new_tokens": NEW, "ignore_eos": True, **overrides})


def run(model, cache, tokens, positions) -> torch.Tensor:
    """Native logits [B, T, V] of ``tokens``/``positions`` [B, T] (written into ``cache``)."""
    logits, _ = model(torch.tensor(tokens), torch.tensor(positions), cache, num_logits=None)
    return logits


# --- configuration --------------------------------------------------------------------------------

EXPECTED = {  # what each case must read as: the feature the case exists to test
    "llama": dict(family="llama", qkv_bias=False, qk_norm=False, tie_word_embeddings=False,
                  rope_theta_global=500.0),
    "llama3-rope": dict(family="llama", tie_word_embeddings=False),
    "mistral": dict(family="mistral", sliding_window=WINDOW, layer_types=("sliding",) * 3),
    "qwen2": dict(family="qwen2", qkv_bias=True, qk_norm=False, tie_word_embeddings=True,
                  rope_scaling_factor=2.0),
    "qwen3": dict(family="qwen3", qkv_bias=False, qk_norm=True, tie_word_embeddings=False),
    "gemma2": dict(family="gemma2", norm_offset=1.0, sandwich_norms=True, attn_logit_softcap=4.0,
                   final_logit_softcap=8.0, query_pre_attn_scalar=24.0, sliding_window=WINDOW,
                   layer_types=("sliding", "global", "sliding", "global")),
    "gemma3": dict(family="gemma3", qk_norm=True, sliding_window=WINDOW, rope_scaling_factor=8.0,
                   rope_theta_global=1_000_000.0, rope_theta_local=10_000.0,
                   layer_types=("sliding",) * 5 + ("global",)),
}


def test_each_family_loads_natively_with_its_architecture(case):
    target = case.target
    assert isinstance(target.model, DecoderModel)
    for field, value in EXPECTED[case.name].items():
        assert getattr(target.config, field) == value, field
    if case.name == "llama3-rope":
        scaling = target.config.rope_scaling
        assert scaling is not None and scaling.kind == "llama3" and scaling.factor == 8.0


@pytest.mark.parametrize("case_name, change, what", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "layer_types": None},
     "use_sliding_window"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "layer_types": None},
     "use_sliding_window"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10_000.0,
                                   "original_max_position_embeddings": 128}}, "yarn"),
])
def test_options_the_native_model_lacks_are_refused_toward_the_hf_backend(tmp_path, case_name,
                                                                          change, what):
    model = family_model(case_name, seed=9)
    folder = save_with_tokenizer(model, tmp_path / case_name)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(ModelLoadError, match="--backend hf") as info:
        load_target(folder, "fp32", with_tokenizer=False)
    assert what in str(info.value)
    fallback = load_target(folder, "fp32", with_tokenizer=False, backend="hf")
    assert fallback.weight_format == "hf-fp32"


@pytest.mark.parametrize("case_name", ["qwen2", "qwen3"])
def test_qwen_sliding_layers_named_by_layer_types_match_transformers(tmp_path, case_name):
    """Qwen2/3 with ``use_sliding_window``: transformers 5 names the sliding layers in
    ``layer_types`` (here the layers from ``max_window_layers`` = 1 on), and the native model
    follows them."""
    cfg = family_config(case_name)
    cfg = cfg.__class__(**{**cfg.to_dict(), "use_sliding_window": True, "sliding_window": WINDOW,
                           "max_window_layers": 1, "layer_types": None})
    model = build(cfg, seed=11)
    target = load_target(save_with_tokenizer(model, tmp_path / case_name), "fp32",
                         with_tokenizer=False)
    assert target.config.layer_types == ("global", "sliding", "sliding")
    tokens = random_tokens(40, 12)
    assert_close(run(target.model, target.model.new_cache(1, 64), [tokens], [list(range(40))])[0],
                 hf_logits(model, tokens), f"{case_name} with sliding layers")


@pytest.mark.parametrize("change", [
    {"final_logit_softcapping": 5.0}, {"tie_word_embeddings": False},
    {"attn_logit_softcapping": 3.0}, {"attn_logit_softcapping": 3.0, "tie_word_embeddings": False}])
def test_gemma3_variants_the_fused_model_lacks_still_match_transformers(tmp_path, change):
    """A Gemma 3 with a final soft-cap or its own LM head matches too; an attention soft-cap,
    which transformers' Gemma 3 ignores, is ignored."""
    cfg = family_config("gemma3")
    model = build(cfg.__class__(**{**cfg.to_dict(), **change}), seed=13)
    target = load_target(save_with_tokenizer(model, tmp_path / "g3"), "fp32", with_tokenizer=False)
    tokens = random_tokens(40, 14)
    assert_close(run(target.model, target.model.new_cache(1, 64), [tokens], [list(range(40))])[0],
                 hf_logits(model, tokens), f"gemma3 with {change}")
    assert isinstance(target.model, DecoderModel)
    out = Engine(target.model, proposer=NgramProposer()).generate([REPEATS], options())[0]
    assert out.token_ids == hf_greedy(model, REPEATS, NEW)


def legacy_config(raw: dict) -> dict:
    """A transformers 5 ``config.json`` as transformers 4.x wrote it: ``rope_theta`` (+
    ``rope_local_base_freq``) and ``rope_scaling`` instead of ``rope_parameters``, no
    ``layer_types`` (Gemma 3: ``sliding_window_pattern``)."""
    legacy = {k: v for k, v in raw.items() if k not in ("rope_parameters", "layer_types")}
    rope = raw.get("rope_parameters") or {}
    if "full_attention" in rope:
        legacy["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        legacy["sliding_window_pattern"] = 6
        rope = rope["full_attention"]
    legacy["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return legacy


@pytest.mark.parametrize("case_name", CASES)
def test_transformers_4_config_layouts_read_the_same(case_name):
    raw = family_config(case_name).to_dict()
    assert config_from_hf(legacy_config(raw)) == config_from_hf(raw)


def test_llama3_rope_scaling_rescales_each_frequency_as_llama_cpp_tabulates_it():
    scaled = config_from_hf(family_config("llama3-rope").to_dict()).rope_inv_freq(True)
    divisors = llama3_rope_divisors(LLAMA3_ROPE, 16)
    assert divisors[0] == 1.0 and 1.0 < divisors[1] < divisors[2] < 8.0 == divisors[-1]
    plain = [1.0 / 10_000.0 ** (2 * i / 16) for i in range(8)]
    assert scaled == pytest.approx([f / d for f, d in zip(plain, divisors)], rel=1e-6)


DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10_000.0}
FEATURES = {  # case -> [(feature, config change, parameters to reset)] each case exists to test
    "llama": [("rope theta 500", {"rope_parameters": DEFAULT_ROPE}, ())],
    "llama3-rope": [("llama3 scaling", {"rope_parameters": DEFAULT_ROPE}, ())],
    "mistral": [("window", {"sliding_window": None}, ())],
    "qwen2": [("linear rope", {"rope_parameters": DEFAULT_ROPE}, ()),
              ("qkv bias", {}, ("proj.bias",))],
    "qwen3": [("qk norm", {}, ("q_norm.weight", "k_norm.weight"))],
    "gemma2": [("attention soft-cap", {"attn_logit_softcapping": None}, ()),
               ("final soft-cap", {"final_logit_softcapping": None}, ()),
               ("query_pre_attn_scalar", {"query_pre_attn_scalar": 16}, ()),
               ("window", {"sliding_window": 512}, ())],
    "gemma3": [("window", {"sliding_window": 512}, ()),
               ("linear global rope", {"rope_parameters": {
                   "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}, ())],
}


def test_the_features_each_case_tests_change_transformers_logits(case):
    """Each case's features (window, soft-caps, query scale, rope scaling or theta, QKV bias,
    QK-norm) change transformers' own logits for these prompts, so matching them is evidence the
    native model implements them."""
    cfg = case.model.config
    tokens = random_tokens(40, 5)
    reference = hf_logits(case.model, tokens)
    for feature, change, reset in FEATURES[case.name]:
        twin = build(cfg.__class__(**{**cfg.to_dict(), **change}))
        twin.load_state_dict(case.model.state_dict())
        with torch.no_grad():
            for name, param in twin.named_parameters():
                if name.endswith(reset or ("-",)):
                    param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        diff = (hf_logits(twin, tokens) - reference).abs().max().item()
        assert diff > 100 * RTOL * reference.abs().max().item(), feature


# --- logits against transformers -----------------------------------------------------------------

def test_prefill_decode_and_verification_logits_match_transformers(case):
    model = case.target.model
    tokens = random_tokens(44, CASES.index(case.name))
    reference = hf_logits(case.model, tokens)  # [44, V]
    cache = model.new_cache(1, 64)
    prefill = 20
    assert_close(run(model, cache, [tokens[:prefill]], [list(range(prefill))])[0],
                 reference[:prefill], "prefill")
    for pos in range(prefill, prefill + 6):  # one-token decode steps
        assert_close(run(model, cache, [[tokens[pos]]], [[pos]])[0, 0], reference[pos],
                     f"decode at {pos}")
    block = range(26, 31)  # a verification block: pending token + 4 drafts
    assert_close(run(model, cache, [[tokens[p] for p in block]], [list(block)])[0],
                 reference[26:31], "verification block")
    # a block of wrong drafts, rolled back by position and rewritten with the right tokens
    run(model, cache, [[tokens[31]] + [3, 4, 5, 6]], [list(range(31, 36))])
    block = range(32, 44)
    assert_close(run(model, cache, [[tokens[p] for p in block]], [list(block)])[0],
                 reference[32:44], "block after a rollback")


def test_ragged_batch_logits_match_transformers(case):
    model = case.target.model
    rows = [random_tokens(30, 10), random_tokens(30, 11)]
    lengths = [11, 19]
    references = [hf_logits(case.model, row) for row in rows]  # [30, V] each
    cache = model.new_cache(2, 64)
    width = max(lengths)
    padded = [row[:n] + [0] * (width - n) for row, n in zip(rows, lengths)]  # right-padded
    logits = run(model, cache, padded, [list(range(width))] * 2)
    for b, n in enumerate(lengths):
        assert_close(logits[b, :n], references[b][:n], f"batch prefill row {b}")
    # one ragged decode step: each row at its own position
    logits = run(model, cache, [[rows[b][n]] for b, n in enumerate(lengths)],
                 [[n] for n in lengths])
    for b, n in enumerate(lengths):
        assert_close(logits[b, 0], references[b][n], f"batch decode row {b}")
    # one ragged verification block of 5 per row
    starts = [n + 1 for n in lengths]
    logits = run(model, cache, [rows[b][s:s + 5] for b, s in enumerate(starts)],
                 [list(range(s, s + 5)) for s in starts])
    for b, s in enumerate(starts):
        assert_close(logits[b], references[b][s:s + 5], f"batch verification row {b}")


# --- greedy decoding ------------------------------------------------------------------------------

def test_greedy_32_tokens_equal_transformers_plain_speculative_and_batched(case):
    model = case.target.model
    reference = hf_greedy(case.model, REPEATS, NEW)
    plain = Engine(model).generate([REPEATS], options())[0]
    assert plain.token_ids == reference
    spec = Engine(model, proposer=NgramProposer(), policy=False).generate([REPEATS], options())[0]
    assert spec.token_ids == reference
    # drafts were verified in k+1 blocks, some accepted and some rolled back
    assert 0 < spec.stats.draft_accepted < spec.stats.draft_proposed
    both = Engine(model, proposer=NgramProposer()).generate([REPEATS, SHORT], options())
    assert both[0].token_ids == reference
    assert both[1].token_ids == hf_greedy(case.model, SHORT, NEW)


@pytest.mark.parametrize("weights", ["int8", "int4", "bf16"])
def test_packed_formats_speculation_is_lossless(case, weights):
    target = load_target(case.folder, weights, with_tokenizer=False)
    assert target.weight_format == weights and target.model.weight_format == weights
    plain = Engine(target.model).generate([REPEATS, SHORT], options())
    spec = Engine(target.model, proposer=NgramProposer()).generate([REPEATS, SHORT], options())
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    alone = Engine(target.model, proposer=NgramProposer()).generate([SHORT], options())[0]
    assert alone.token_ids == plain[1].token_ids
    stored = load_target(case.folder, weights, with_tokenizer=False)  # read back, not repacked
    again = Engine(stored.model).generate([REPEATS, SHORT], options())
    assert [r.token_ids for r in again] == [r.token_ids for r in plain]


def test_a_changed_config_json_is_not_served_from_a_stale_packed_model(case, tmp_path):
    """Same weights, another config.json (the window, the caps, the rope): the native model must
    follow the new config, not the one packed and stored for the first folder."""
    cfg = case.model.config
    change = {"max_position_embeddings": 256}
    if case.name in ("mistral", "gemma2", "gemma3"):
        change["sliding_window"] = 4
    folder = tmp_path / "edited"
    shutil.copytree(case.folder, folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.warns(UserWarning, match="another configuration"):  # rebuilt, not served stale
        edited = load_target(folder, "fp32", with_tokenizer=False)
    for field, value in change.items():
        assert getattr(edited.config, field) == value
        assert getattr(edited.model.config, field) == value
    twin = build(cfg.__class__(**{**cfg.to_dict(), **change}))
    twin.load_state_dict(case.model.state_dict())
    tokens = random_tokens(30, 3)
    assert_close(run(edited.model, edited.model.new_cache(1, 64), [tokens], [list(range(30))])[0],
                 hf_logits(twin, tokens), "edited config")


# --- GGUF -----------------------------------------------------------------------------------------

def test_gguf_of_each_family_matches_transformers(case):
    tokenizer = "gpt2" if case.name.startswith("qwen") else "llama"
    path = write_gguf(case.tmp / f"{case.name}.gguf", case.model, tokenizer=tokenizer)
    target = load_target(path, "fp32")
    assert isinstance(target.model, DecoderModel)
    assert target.config.family == GGUF_ARCH[case.model.config.model_type]
    if case.name == "llama3-rope":
        assert target.config.rope_scaling.kind == "table"
    folder_config = load_weights(case.folder, with_tensors=False).config
    for is_global in (True, False):  # the same rotary tables, however the scaling is written
        assert target.config.rope_inv_freq(is_global) == pytest.approx(
            folder_config.rope_inv_freq(is_global), rel=1e-6)
    assert target.config.rms_norm_eps == pytest.approx(folder_config.rms_norm_eps)
    representation = {"name", "rms_norm_eps", "rope_scaling", "rope_scaling_factor",
                      "query_pre_attn_scalar" if case.name == "gemma2" else "-"}
    for field in dataclasses.fields(folder_config):
        if field.name not in representation:
            assert getattr(target.config, field.name) == getattr(folder_config, field.name), field
    # float32 tensors come back exactly as the folder's (Gemma norms: as float32 (1 + w) - 1)
    from_gguf, from_folder = load_weights(path).tensors, load_weights(case.folder).tensors
    assert set(from_gguf) == set(from_folder)
    for name, tensor in from_folder.items():
        if case.name.startswith("gemma") and name.endswith("norm.weight"):
            tensor = (tensor + 1.0) - 1.0
        assert torch.equal(from_gguf[name], tensor), name
    reference = gguf_reference(case.model)
    tokens = random_tokens(40, 21)
    assert_close(run(target.model, target.model.new_cache(1, 64), [tokens], [list(range(40))])[0],
                 hf_logits(reference, tokens), "GGUF prefill")
    both = Engine(target.model, proposer=NgramProposer()).generate([REPEATS, SHORT], options())
    assert both[0].token_ids == hf_greedy(reference, REPEATS, NEW)
    assert both[1].token_ids == hf_greedy(reference, SHORT, NEW)
    text = "the rain in spain"
    ids = target.tokenizer.encode(text)
    assert ids[0] == 2 and len(ids) > 2 and all(0 <= i < 512 for i in ids)
    assert target.tokenizer.decode(ids[1:]) == text
    again = load_target(path, "fp32", with_tokenizer=False)  # from the dequantized cache
    assert again.config == target.config


def test_gguf_gemma2_27b_shape_scales_queries_by_hidden_over_heads(tmp_path):
    """llama.cpp's Gemma 2 GGUF has no query_pre_attn_scalar: the 46-layer (27B) shape scales
    queries by (hidden / heads) ** -0.5, every other by head_dim ** -0.5."""
    cfg = family_config("gemma2")
    cfg = cfg.__class__(**{**cfg.to_dict(), "hidden_size": 96, "num_hidden_layers": 46,
                           "layer_types": None, "query_pre_attn_scalar": 96 // 4})
    model = build(cfg, seed=15)
    target = load_target(write_gguf(tmp_path / "g2-27b.gguf", model), "fp32",
                         with_tokenizer=False)
    assert target.config.query_pre_attn_scalar == 24.0
    tokens = random_tokens(24, 16)
    assert_close(run(target.model, target.model.new_cache(1, 64), [tokens], [list(range(24))])[0],
                 hf_logits(model, tokens), "Gemma 2 27B-shaped GGUF")


@pytest.mark.parametrize("key, value, what", [("rope.scaling.type", "yarn", "yarn"),
                                              ("attention.head_count_kv", [2, 2, 1], "per-layer")])
def test_gguf_options_the_native_model_lacks_are_refused(tmp_path, key, value, what):
    model = family_model("llama", seed=17)
    path = write_gguf(tmp_path / "odd.gguf", model, extra={f"llama.{key}": value})
    message = load_error(path)
    assert what in message and "--backend hf" in message


# --- every supported block type -------------------------------------------------------------------

QUANT_LAYOUT = {  # tensor -> block type: every supported type, the K-quants where rows allow 256
    "token_embd.weight": Q.Q8_0, "output.weight": Q.BF16,
    "blk.0.attn_q.weight": Q.F16, "blk.0.attn_k.weight": Q.BF16, "blk.0.attn_v.weight": Q.Q8_0,
    "blk.0.attn_output.weight": Q.Q4_0, "blk.0.ffn_gate.weight": Q.Q4_1,
    "blk.0.ffn_up.weight": Q.Q5_0, "blk.0.ffn_down.weight": Q.Q4_K,
    "blk.1.attn_q.weight": Q.Q5_1, "blk.1.attn_k.weight": Q.Q4_0, "blk.1.attn_v.weight": Q.Q4_1,
    "blk.1.attn_output.weight": Q.Q5_0, "blk.1.ffn_gate.weight": Q.Q8_0,
    "blk.1.ffn_up.weight": Q.F16, "blk.1.ffn_down.weight": Q.Q5_K,
    "blk.2.attn_q.weight": Q.Q4_1, "blk.2.attn_k.weight": Q.Q5_1, "blk.2.attn_v.weight": Q.Q5_0,
    "blk.2.attn_output.weight": Q.F32, "blk.2.ffn_gate.weight": Q.BF16,
    "blk.2.ffn_up.weight": Q.Q4_0, "blk.2.ffn_down.weight": Q.Q6_K,
}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, private_cache):
    """A Llama GGUF holding every supported block type (intermediate 256 so the down projections
    can be K-quants), and its transformers twin on the weights the gguf package decodes."""
    config = family_config("llama")
    config = config.__class__(**{**config.to_dict(), "intermediate_size": 256})
    model = build(config, seed=42)
    path = write_gguf(tmp_path_factory.mktemp("quant") / "mixed.gguf", model, QUANT_LAYOUT,
                      encode=lambda name, array, kind: random_k_quant(array, kind,
                                                                      seed=len(name)))
    reader = gguf.GGUFReader(str(path))
    decoded = {t.name: (t.tensor_type, dequantize(t.data, t.tensor_type).astype(np.float32))
               for t in reader.tensors}
    raw = {t.name: np.array(t.data).view(np.uint8).reshape(len(t.data) if t.data.ndim > 1 else 1,
                                                            -1)
           for t in reader.tensors}  # [rows, bytes]
    del reader
    state = {}
    for name, tensor in model.state_dict().items():
        array = decoded[gguf_name(name, sandwich=False)][1].reshape(tuple(tensor.shape))
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # undo the interleaving
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            order = interleave_rotary_rows(np.arange(array.shape[0]), heads)
            array = array[np.argsort(order)]
        state[name] = torch.from_numpy(array.copy())
    twin = build(config, seed=42)
    twin.load_state_dict(state)
    return SimpleNamespace(path=path, decoded=decoded, raw=raw, twin=twin.eval())


def test_the_mixed_file_holds_every_supported_block_type(quantized):
    kinds = {kind.name for kind, _ in quantized.decoded.values()}
    assert kinds == set(SUPPORTED_TENSOR_TYPES)


def test_every_block_type_decodes_to_what_gguf_makes_of_its_bytes(quantized):
    ours = read_gguf_tensors(quantized.path)
    assert set(ours) == set(quantized.decoded)
    for name, (kind, reference) in quantized.decoded.items():
        assert ours[name].dtype == np.float32
        assert ours[name].shape == reference.shape, (name, kind.name)
        assert np.array_equal(ours[name], reference), (name, kind.name)
        assert np.isfinite(reference).all() and reference.std() > 0, (name, kind.name)
        mine = decode_blocks(quantized.raw[name], kind.name).reshape(reference.shape)
        assert np.array_equal(ours[name], mine), (name, kind.name)  # the block layout, by hand


REAL_TYPES = {"smollm2": {"Q4_1", "Q8_0", "F32"}, "gemma3": {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"}}


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(REAL_TYPES))
def test_real_files_block_types_decode_as_their_layout_says(name, tmp_path):
    """The embedded GGUFs' block types (SmolLM2: Q4_1/Q8_0; Gemma 3 270M Q4_K_M: Q4_K, Q6_K,
    Q5_0, Q8_0): a few rows of the first tensor of each type, copied into a small GGUF, decode to
    what the block layout says (real quantizer output, not random blocks)."""
    from mtpspec.loading import EMBEDDED_MODELS

    try:
        source = EMBEDDED_MODELS[name]()
    except ModelLoadError as err:
        pytest.skip(str(err))
    table, data_start = gguf_table(source)
    first = {}
    for tensor_name, shape, kind, offset in table:
        first.setdefault(Q(kind), (tensor_name, shape, offset))
    assert {kind.name for kind in first} == REAL_TYPES[name]
    writer = gguf.GGUFWriter(str(tmp_path / "slices.gguf"), "llama")
    expected = {}
    with open(source, "rb") as handle:
        for kind, (tensor_name, shape, offset) in first.items():
            block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
            rows = min(8, int(np.prod(shape[1:])))
            row_bytes = shape[0] // block * block_bytes
            handle.seek(data_start + offset)
            raw = np.frombuffer(handle.read(rows * row_bytes), np.uint8).reshape(rows, row_bytes)
            expected[tensor_name] = (kind, raw)
            if kind == Q.F32:
                writer.add_tensor(tensor_name, raw.view(np.float32))
            else:
                writer.add_tensor(tensor_name, raw, raw_shape=raw.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = read_gguf_tensors(tmp_path / "slices.gguf")
    for tensor_name, (kind, rows) in expected.items():
        mine = decode_blocks(rows, kind.name)
        assert ours[tensor_name].shape == mine.shape, tensor_name
        assert np.array_equal(ours[tensor_name], mine), (tensor_name, kind.name)
        assert np.isfinite(mine).all() and mine.std() > 0


def test_a_model_of_every_block_type_matches_transformers_on_the_decoded_weights(quantized):
    target = load_target(quantized.path, "fp32", with_tokenizer=False)
    tokens = random_tokens(40, 8)
    assert_close(run(target.model, target.model.new_cache(1, 64), [tokens], [list(range(40))])[0],
                 hf_logits(quantized.twin, tokens), "mixed block types")
    out = Engine(target.model, proposer=NgramProposer()).generate([REPEATS], options())[0]
    assert out.token_ids == hf_greedy(quantized.twin, REPEATS, NEW)


# --- errors: one clear line, never a crash --------------------------------------------------------

BROKEN = re.compile(r"truncated|corrupt|not a GGUF|not a readable|version \d+")


def load_error(path) -> str:
    """The one-line message ``load_target`` refuses ``path`` with."""
    with pytest.raises(ModelLoadError) as info:
        load_target(path, "fp32", with_tokenizer=False)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """A valid F32 Llama GGUF (intermediate 256), for the corruption tests."""
    config = family_config("llama")
    model = build(config.__class__(**{**config.to_dict(), "intermediate_size": 256}), seed=3)
    return write_gguf(tmp_path_factory.mktemp("valid") / "valid.gguf", model)


@pytest.mark.parametrize("arch", ["phi3", "rwkv6"])
def test_an_unsupported_architecture_names_the_supported_ones(small_gguf, tmp_path, arch):
    model = family_model("llama", seed=4)
    path = write_gguf(tmp_path / f"{arch}.gguf", model, arch=arch)
    message = load_error(path)
    assert arch in message and "--backend hf" in message
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"):
        assert family in message
    with pytest.raises(ModelLoadError, match="--backend hf"):
        load_weights(path, with_tensors=False)


def patched(source, target, at: int, fmt: str, value) -> object:
    import struct

    data = bytearray(source.read_bytes())
    struct.pack_into(fmt, data, at, value)
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("kind", [Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ2_XXS, Q.TQ1_0])
def test_an_unsupported_block_type_names_the_supported_ones(small_gguf, tmp_path, kind):
    entry = gguf_tensor_table(small_gguf)["blk.1.ffn_down.weight"]  # 256 columns: any block fits
    path = patched(small_gguf, tmp_path / "odd.gguf", entry["type_at"], "<I", int(kind))
    message = load_error(path)
    assert kind.name in message and "blk.1.ffn_down.weight" in message
    assert all(name in message for name in SUPPORTED_TENSOR_TYPES)
    with pytest.raises(GGUFError, match="supported: F32, F16"):
        read_gguf_tensors(path)


def test_an_unknown_block_type_id_names_the_supported_ones(small_gguf, tmp_path):
    entry = gguf_tensor_table(small_gguf)["blk.0.attn_q.weight"]
    path = patched(small_gguf, tmp_path / "unknown.gguf", entry["type_at"], "<I", 250)
    message = load_error(path)
    assert "250" in message and all(name in message for name in SUPPORTED_TENSOR_TYPES)


def test_truncated_files_are_clear_errors(small_gguf, tmp_path):
    data = small_gguf.read_bytes()
    table = gguf_tensor_table(small_gguf)
    header_end = max(entry["offset_at"] for entry in table.values()) + 8
    cuts = [0, 3, 4, 10, 24, 40, 1000, 5000, header_end - 30, header_end - 1, header_end + 8,
            len(data) // 2, len(data) - 4]
    for cut in cuts:
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(data[:cut])
        message = load_error(path)
        assert path.name in message and BROKEN.search(message), (cut, message)
        with pytest.raises(GGUFError):
            read_gguf_tensors(path)


def test_random_bytes_and_corrupt_fields_are_clear_errors(small_gguf, tmp_path):
    rng = np.random.default_rng(0)
    data = small_gguf.read_bytes()
    for seed in range(4):  # the magic (and version 3), then noise
        noise = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        path = tmp_path / f"noise-{seed}.gguf"
        path.write_bytes(data[:4] + (b"\x03\x00\x00\x00" if seed % 2 else b"") + noise)
        assert BROKEN.search(load_error(path))
    entry = gguf_tensor_table(small_gguf)["blk.2.ffn_up.weight"]
    corruptions = {
        "offset-past-end": (entry["offset_at"], "<Q", len(data) * 4),
        "offset-huge": (entry["offset_at"], "<Q", 2**63),
        "dims-huge": (entry["dims_at"], "<I", 2**31),
        "dims-zero": (entry["dims_at"], "<I", 0),
        "shape-huge": (entry["dims_at"] + 4, "<Q", 2**40),
        "kv-count-huge": (16, "<Q", 2**60),
        "tensor-count-huge": (8, "<Q", 2**60),
    }
    for label, (at, fmt, value) in corruptions.items():
        message = load_error(patched(small_gguf, tmp_path / f"{label}.gguf", at, fmt, value))
        assert BROKEN.search(message), (label, message)
    # noise over the metadata after a valid start
    noisy = bytearray(data)
    noisy[200:2200] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (tmp_path / "noisy.gguf").write_bytes(bytes(noisy))
    assert BROKEN.search(load_error(tmp_path / "noisy.gguf"))
