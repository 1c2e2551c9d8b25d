"""Gemma 4 text on the native ``DecoderModel``, against transformers' own implementation.

Tiny random models shaped like the real ones (``tiny_gemma4``): E2B/E4B (per-layer inputs, the last
three layers sharing K/V, double-wide MLPs on them, wider global heads) and dense 31B (keys = values
on global layers with more kv heads, no sharing). Both are saved as Hugging Face folders and loaded
by ``load_target`` as any model would be. Checked in float32 against transformers (eager
attention): logits of a prefill, a one-token decode, a verification block and a ragged batch
(rows at different positions, past the 8-token sliding window); greedy continuations of 32 tokens
equal ``generate``'s, alone and batched; speculative decoding with an assistant drafter loaded from
a ``Gemma4AssistantForCausalLM`` folder (and with n-gram drafts) equals plain greedy, in fp32 and
in the packed int8 format; the packed store reads back the same model; KV-shared layers write
nothing and read their source layer's slots; what is not supported is refused by name.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from mtpspec.engine import Engine, GenerateOptions  # noqa: E402
from mtpspec.families import ModelLoadError, config_from_gguf, config_from_hf  # noqa: E402
from mtpspec.models.decoder import DecoderModel  # noqa: E402
from mtpspec.proposers.assistant import AssistantProposer  # noqa: E402
from mtpspec.proposers.base import Draft  # noqa: E402
from mtpspec.proposers.factory import ProposerRequest, make_proposer  # noqa: E402
from mtpspec.proposers.ngram import NgramProposer  # noqa: E402
from mtpspec.runtime import load_target  # noqa: E402

from tiny_gemma4 import (gemma4_assistant, gemma4_target, gemma4_target_config,  # noqa: E402
                         hf_greedy, save_with_tokenizer)

NEW = 32
ATOL = 1e-4  # float32 logits of magnitude ~5; the two implementations differ by ~3e-5
PROMPT = [2, 10, 20, 30, 40, 10, 20, 30, 40, 10, 20, 30, 77, 78]


@pytest.fixture(scope="module", params=["e2b", "31b"])
def pair(request, tmp_path_factory):
    """(kind, transformers target in eager attention, our fp32 Target, assistant folder)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"g4-{kind}")
    hf = gemma4_target(kind)
    hf.set_attn_implementation("eager")
    save_with_tokenizer(hf, root / "target")
    gemma4_assistant(kind).save_pretrained(root / "assistant")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTPSPEC_CACHE", str(root / "cache"))
        target = load_target(root / "target", "fp32", with_tokenizer=False)
    return kind, hf, target, root


def reference_logits(hf, ids: list[int]) -> torch.Tensor:
    """transformers' logits [T, V] of one sequence, no cache."""
    with torch.no_grad():
        return hf(torch.tensor([ids]), use_cache=False).logits[0]


def random_ids(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(3, 512, (length - 1,), generator=gen).tolist()


class PartlyRightProposer:
    """Drafts the known greedy continuation with every draft's token ``right`` corrupted: each
    step accepts ``right`` drafts and rolls the rest back (random drafts are never accepted)."""

    name = "partly-right"

    def __init__(self, sequences: list[list[int]], right: int = 2):
        self.sequences, self.right = sequences, right

    def reset(self) -> None:
        pass

    def propose(self, state, k: int) -> Draft:
        rows = []
        for tokens in state.tokens:
            full = next(seq for seq in self.sequences if seq[:len(tokens)] == tokens)
            future = (full[len(tokens):] + [0] * k)[:k]
            rows.append([(t + 1) % 512 if i == self.right else t for i, t in enumerate(future)])
        return Draft(tokens=torch.tensor(rows, dtype=torch.long))


def options(**overrides) -> GenerateOptions:
    return GenerateOptions(**{"max_new_tokens": NEW, "ignore_eos": True, **overrides})


def test_loads_natively_with_the_gemma4_fields(pair):
    kind, hf, target, _ = pair
    model, cfg = target.model, target.config
    assert isinstance(model, DecoderModel) and cfg.family == "gemma4" and not cfg.uniform_layers
    assert (cfg.global_head_dim, cfg.attention_scale, cfg.value_norm) == (32, 1.0, True)
    assert cfg.rope_partial_global == 0.25 and cfg.final_logit_softcap == 30.0
    if kind == "e2b":
        assert cfg.per_layer_input_size == 8 and cfg.double_wide_mlp
        assert model.kv_source == [0, 1, 2, 1, 1, 2]  # transformers' "store" layers are 1 and 2
        assert [cfg.layer_intermediate(i) for i in range(6)] == [128] * 3 + [256] * 3
    else:
        assert cfg.attention_k_eq_v and cfg.global_num_kv_heads == 2
        assert model.kv_source == list(range(6)) and model.kv_shape(5) == (2, 32)


def test_prefill_decode_and_verification_logits_match_transformers(pair):
    _, hf, target, _ = pair
    model = target.model
    ids = random_ids(0, 26)
    reference = reference_logits(hf, ids)  # [26, V]
    cache = model.new_cache(1, 64)
    prefill, _ = model(torch.tensor([ids[:20]]), torch.arange(20)[None], cache, num_logits=None)
    torch.testing.assert_close(prefill[0], reference[:20], atol=ATOL, rtol=0)
    decode, _ = model(torch.tensor([[ids[20]]]), torch.tensor([[20]]), cache)
    torch.testing.assert_close(decode[0, 0], reference[20], atol=ATOL, rtol=0)
    block, _ = model(torch.tensor([ids[21:26]]), torch.arange(21, 26)[None], cache, num_logits=None)
    torch.testing.assert_close(block[0], reference[21:26], atol=ATOL, rtol=0)
    # a rejected block rolled back (positions moved back) and replaced: stale slots are never read
    other = ids[:21] + random_ids(7, 6)[1:]
    again, _ = model(torch.tensor([other[21:26]]), torch.arange(21, 26)[None], cache, num_logits=None)
    torch.testing.assert_close(again[0], reference_logits(hf, other)[21:26], atol=ATOL, rtol=0)


def test_ragged_batch_logits_match_transformers(pair):
    _, hf, target, _ = pair
    model = target.model
    long, short = random_ids(1, 25), random_ids(2, 16)
    cache = model.new_cache(2, 64)
    ids = torch.zeros(2, 20, dtype=torch.long)  # right-padded prefill of 20 and 11 tokens
    ids[0], ids[1, :11] = torch.tensor(long[:20]), torch.tensor(short[:11])
    model(ids, torch.arange(20).expand(2, -1), cache, num_logits=0)
    block = torch.tensor([long[20:25], short[11:16]])
    positions = torch.stack([torch.arange(20, 25), torch.arange(11, 16)])  # [2, 5] per row
    logits, _ = model(block, positions, cache, num_logits=None)
    torch.testing.assert_close(logits[0], reference_logits(hf, long)[20:25], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], reference_logits(hf, short)[11:16], atol=ATOL, rtol=0)


def test_shared_layers_write_nothing_and_read_their_source(pair):
    kind, _, target, _ = pair
    cache = target.model.new_cache(1, 32)
    target.model(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], cache, num_logits=0)
    for layer, source in enumerate(target.model.kv_source):
        assert cache.k[layer] is cache.k.buffers[source] and cache.v[layer] is cache.v.buffers[source]
        assert (cache.k.buffers[layer] is None) == (source != layer)
        heads, size = target.model.kv_shape(layer)
        assert cache.k[layer].shape == (1, heads, 32, size)
    assert (cache.k.buffers[3] is None) == (kind == "e2b")


def test_rows_move_between_caches_as_with_a_stacked_one(pair):
    """What the batch session does when a row finishes or joins: ``k[:, row, :, :n] = ...``."""
    _, _, target, _ = pair
    model = target.model
    joining = model.new_cache(1, 32)
    model(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], joining, num_logits=0)
    session = model.new_cache(3, 32)
    n = len(PROMPT)
    session.k[:, 2, :, :n] = joining.k[:, 0, :, :n]
    session.v[:, 2, :, :n] = joining.v[:, 0, :, :n]
    session.k[:, 0, :, :n] = session.k[:, 2, :, :n]  # the last row moves into a hole
    session.v[:, 0, :, :n] = session.v[:, 2, :, :n]
    for layer in range(model.config.num_layers):
        for row in (0, 2):
            assert torch.equal(session.k[layer, row, :, :n], joining.k[layer, 0, :, :n])
            assert torch.equal(session.v[layer, row, :, :n], joining.v[layer, 0, :, :n])
        assert not session.k[layer, 1].any()


def test_greedy_equals_transformers_generate_alone_and_batched(pair):
    _, hf, target, _ = pair
    short = [2, 5, 6, 7]
    reference = hf_greedy(hf, PROMPT, NEW)
    assert Engine(target.model).generate([PROMPT], options())[0].token_ids == reference
    both = Engine(target.model).generate([PROMPT, short], options())
    assert [out.token_ids for out in both] == [reference, hf_greedy(hf, short, NEW)]


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_speculation_with_an_assistant_drafter_is_lossless(pair, weights):
    _, hf, fp32_target, root = pair
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTPSPEC_CACHE", str(root / "cache"))
        target = (fp32_target if weights == "fp32"
                  else load_target(root / "target", weights, with_tokenizer=False))
    short = [2, 5, 6, 7]
    plain = [out.token_ids for out in Engine(target.model).generate([PROMPT, short], options())]
    if weights == "fp32":
        assert plain[0] == hf_greedy(hf, PROMPT, NEW)
    built = make_proposer("mtp-only", target, ProposerRequest(drafter_path=root / "assistant"))
    assert isinstance(built.proposer, AssistantProposer)
    for proposer in (built.proposer, NgramProposer()):
        spec = Engine(target.model, proposer=proposer).generate([PROMPT], options(draft_k=4))[0]
        assert spec.token_ids == plain[0], type(proposer).__name__
        batched = Engine(target.model, proposer=proposer).generate([PROMPT, short],
                                                                   options(draft_k=4))
        assert [out.token_ids for out in batched] == plain, type(proposer).__name__
    # accepted drafts and mid-block rollbacks, rows at different positions
    oracle = PartlyRightProposer([PROMPT + plain[0], short + plain[1]])
    accepted = Engine(target.model, proposer=oracle, policy=False).generate(
        [PROMPT, short], options(draft_k=4))
    assert [out.token_ids for out in accepted] == plain
    assert all(sum(out.from_draft) >= NEW // 2 for out in accepted)


def test_the_packed_store_reads_back_the_same_model(pair):
    _, _, _, root = pair
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTPSPEC_CACHE", str(root / "store"))
        first = load_target(root / "target", "int8", with_tokenizer=False)  # packs and stores
        stored = sorted((root / "store").rglob("model-int8.safetensors"))
        assert stored
        second = load_target(root / "target", "int8", with_tokenizer=False)  # reads the store
    assert second.config == first.config
    ids = torch.tensor([PROMPT])
    positions = torch.arange(len(PROMPT))[None]
    outputs = [target.model(ids, positions, target.model.new_cache(1, 32), num_logits=None)[0]
               for target in (first, second)]
    assert torch.equal(*outputs)


def test_backend_hf_still_runs_it_through_transformers(pair):
    from mtpspec.models.hf import HFModel

    _, hf, _, root = pair
    target = load_target(root / "target", "fp32", with_tokenizer=False, backend="hf")
    assert isinstance(target.model, HFModel)
    assert Engine(target.model).generate([PROMPT], options())[0].token_ids == hf_greedy(
        hf, PROMPT, NEW)


# --- configs: multimodal folders, refusals ---------------------------------------------------------

def test_a_multimodal_folders_text_part_reads_the_same():
    text = gemma4_target_config("e2b").to_dict()
    alone = config_from_hf(text)
    nested = config_from_hf({"model_type": "gemma4", "text_config": text})
    assert dataclasses.replace(nested, name=alone.name) == alone
    legacy = {k: v for k, v in text.items() if k != "per_layer_config"}  # older config.json keys
    legacy.update(global_head_dim=32)
    assert dataclasses.replace(config_from_hf(legacy), name=alone.name) == alone


@pytest.mark.parametrize("change, message", [
    ({"enable_moe_block": True}, "mixture-of-experts"),
    ({"use_bidirectional_attention": "all"}, "bidirectional"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "rope 'yarn'"),
])
def test_what_is_not_supported_is_refused_naming_the_hf_backend(change, message):
    text = {**gemma4_target_config("31b").to_dict(), **change}
    with pytest.raises(ModelLoadError, match=message) as err:
        config_from_hf(text)
    assert "--backend hf" in str(err.value)


def test_gemma4_gguf_is_refused_naming_the_hf_folder():
    with pytest.raises(ModelLoadError, match="Gemma 4 GGUF files are not supported natively"):
        config_from_gguf({"general.architecture": "gemma4"})
