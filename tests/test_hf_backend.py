"""The Hugging Face target backend (``models/hf.py``): any transformers causal LM as a target.

Tiny random Llama, Qwen 3 and Gemma 4 text models saved as folders: ``load_target`` picks the
backend (Llama, Qwen 3, Gemma 3 and Gemma 4 text run natively; ``backend="hf"`` forces
transformers), plain greedy decoding on either backend equals transformers' own ``generate``
token for token, speculative decoding (n-gram and an MTP head reading the wrapped model's KV cache) equals
plain, batches equal single prompts, and ``mtpspec train --model FOLDER`` trains a drafter the
engine loads.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from mtpspec.drafter.head import DrafterConfig, MTPHead, init_weights  # noqa: E402
from mtpspec.engine import Engine, GenerateOptions  # noqa: E402
from mtpspec.loading import ModelLoadError  # noqa: E402
from mtpspec.models.decoder import DecoderModel  # noqa: E402
from mtpspec.models.hf import HFModel  # noqa: E402
from mtpspec.proposers.factory import ProposerRequest, make_proposer  # noqa: E402
from mtpspec.proposers.mtp import MTPProposer  # noqa: E402
from mtpspec.proposers.ngram import NgramProposer  # noqa: E402
from mtpspec.runtime import load_target  # noqa: E402

from tiny_gemma4 import gemma4_target, hf_greedy, llama_like, save_with_tokenizer  # noqa: E402
from tiny_hf import write_tiny_hf_model  # noqa: E402

REPEATS = [2, 10, 20, 30, 40, 10, 20, 30, 40, 10, 20, 30]  # n-gram lookup finds drafts here
NEW = 24


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma4-e2b"])
def family(request, tmp_path_factory):
    """(transformers model, its folder) for one family."""
    name = request.param
    model = gemma4_target("e2b") if name.startswith("gemma4") else llama_like(name)
    return model, save_with_tokenizer(model, tmp_path_factory.mktemp(name))


def options(**overrides) -> GenerateOptions:
    return GenerateOptions(**{"max_new_tokens": NEW, "ignore_eos": True, **overrides})


def test_load_target_picks_the_backend(family, tmp_path):
    model, folder = family
    target = load_target(folder, "fp32", backend="hf")
    assert isinstance(target.model, HFModel) and target.weight_format == "hf-fp32"
    assert target.tokenizer is not None and len(target.weights_hash) == 64
    default = load_target(folder, "fp32")
    assert isinstance(default.model, DecoderModel)  # every family here has a native model
    assert default.config.family == model.config.model_type.removesuffix("_text")
    gemma3 = load_target(write_tiny_hf_model(tmp_path / "g3"), "fp32", with_tokenizer=False)
    assert isinstance(gemma3.model, DecoderModel)  # Gemma 3 folders on the one native decoder


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_greedy_equals_transformers_and_speculation_is_lossless(family, backend):
    model, folder = family
    target = load_target(folder, "fp32", with_tokenizer=False, backend=backend)
    reference = hf_greedy(model, REPEATS, NEW)
    plain = Engine(target.model).generate([REPEATS], options())[0]
    assert plain.token_ids == reference
    spec = Engine(target.model, proposer=NgramProposer()).generate([REPEATS], options())[0]
    assert spec.token_ids == reference
    # a batch of two prompts of different lengths (right-padded prefill) gives the same rows
    short = [2, 5, 6, 7]
    both = Engine(target.model, proposer=NgramProposer()).generate([REPEATS, short], options())
    assert both[0].token_ids == reference
    assert both[1].token_ids == hf_greedy(model, short, NEW)


def test_ngram_drafts_are_accepted_and_rolled_back():
    model = llama_like("llama")
    target = HFModel(model)
    prompt = REPEATS * 3
    spec = Engine(target, proposer=NgramProposer(), policy=False).generate([prompt], options())[0]
    assert spec.token_ids == hf_greedy(model, prompt, NEW)
    assert 0 < sum(spec.from_draft) < NEW or spec.stats.steps < NEW  # accepted and rejected


def test_mtp_head_on_an_hf_target_is_lossless(family):
    model, _ = family
    target = HFModel(model)
    cfg = DrafterConfig.for_target(target.config, num_layers=2, kv_shape=target.kv_shape,
                                   d_draft=32, intermediate_size=64,
                                   num_clusters=8, top_clusters=2, frequency_vocab=64)
    head = MTPHead(cfg)
    init_weights(head, 0)
    reference = hf_greedy(model, REPEATS, NEW)
    for kind in ("full", "clustered"):
        proposer = MTPProposer(head, target, head_kind=kind)
        assert proposer.fused is None  # the C++ path is native-only
        out = Engine(target, proposer=proposer).generate([REPEATS], options())[0]
        assert out.token_ids == reference, kind


def test_packed_formats_fall_back_and_bad_folders_are_refused(family, tmp_path):
    _, folder = family
    with pytest.warns(UserWarning, match="fp32"):
        hf = load_target(folder, "int8", with_tokenizer=False, backend="hf")
        assert hf.weight_format == "hf-fp32"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no-such-model|cannot load"):
        load_target(broken, "fp32", with_tokenizer=False)


def test_train_on_an_hf_folder_makes_a_loadable_drafter(tmp_path):
    from mtpspec.cli import main

    folder = save_with_tokenizer(llama_like("qwen3"), tmp_path / "qwen")
    gen = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(3, 500, (6,), generator=gen).tolist() for _ in range(10)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "drafter"
    code = main(["train", "--model", str(folder), "--out", str(out), "--prompt-ids",
                 str(tmp_path / "prompts.json"), "--num-prompts", "8", "--eval-prompts", "2",
                 "--max-new-tokens", "16", "--gen-batch", "4", "--steps", "3", "--batch-size", "2",
                 "--seq-len", "24", "--unroll", "2", "--d-draft", "32", "--layers", "1",
                 "--heads", "4", "--intermediate", "64", "--clusters", "8", "--top-clusters", "2",
                 "--eval-every", "3"])
    assert code in (0, None)
    target = load_target(folder, "fp32")
    built = make_proposer("mtp-only", target, ProposerRequest(drafter_path=out))
    assert isinstance(built.proposer, MTPProposer)
    prompt = target.tokenizer.encode("hello hello hello")
    spec = Engine(target.model, proposer=built.proposer).generate([prompt], options())[0]
    assert spec.token_ids == Engine(target.model).generate([prompt], options())[0].token_ids
