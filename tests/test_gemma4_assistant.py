"""Gemma 4 targets with Google's assistant drafters (``Gemma4AssistantForCausalLM`` folders).

Tiny random models shaped like the real pairs: E2B/E4B (per-layer inputs and KV sharing in the
target; ordered-embedding clustered head in the assistant) and 31B (no sharing, keys = values on
wider global layers; dense head). Checked against transformers itself: the tokens our head drafts
equal the candidates of transformers' ``SinglePositionMultiTokenCandidateGenerator`` for the same
state (also past the sliding window), our greedy speculative output equals transformers' plain
greedy output, a head saved in the assistant layout loads back into transformers unchanged, and a
drafter that does not fit its target is refused with a message naming the mismatch.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from mtpspec.drafter.checkpoint import (DrafterMismatchError, load_drafter,  # noqa: E402
                                        save_drafter)
from mtpspec.drafter.gemma4_assistant import (assistant_config, load_assistant,  # noqa: E402
                                              new_assistant_config, save_assistant)
from mtpspec.drafter.head import DrafterConfig, MTPHead  # noqa: E402
from mtpspec.engine import Engine, GenerateOptions  # noqa: E402
from mtpspec.proposers.assistant import AssistantProposer  # noqa: E402
from mtpspec.proposers.base import DraftState  # noqa: E402
from mtpspec.proposers.factory import ProposerRequest, SpecError, make_proposer  # noqa: E402
from mtpspec.runtime import load_target  # noqa: E402
from mtpspec.sampling import SamplingParams  # noqa: E402

from tiny_gemma4 import LAYER_TYPES  # noqa: E402
from tiny_gemma4 import assistant_config as assistant_config_of  # noqa: E402
from tiny_gemma4 import (gemma4_assistant, gemma4_target, hf_greedy, llama_like,  # noqa: E402
                         save_with_tokenizer)

K = 5


@pytest.fixture(scope="module", params=["e2b", "31b"])
def pair(request, tmp_path_factory):
    """(kind, HF target, HF assistant, our Target, assistant folder)."""
    kind = request.param
    hf_target, hf_assistant = gemma4_target(kind), gemma4_assistant(kind)
    root = tmp_path_factory.mktemp(kind)
    target = load_target(save_with_tokenizer(hf_target, root / "target"), "fp32")
    hf_assistant.save_pretrained(root / "assistant")
    return kind, hf_target, hf_assistant, target, root / "assistant"


def transformers_candidates(hf_target, hf_assistant, prompt: list[int], k: int):
    """transformers' MTP candidates right after the prompt, and the pending token."""
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import (
        SinglePositionMultiTokenCandidateGenerator,
    )

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_target(ids, return_shared_kv_states=True, output_hidden_states=True,
                        use_cache=False)
    pending = int(out.logits[0, -1].argmax())
    inputs = torch.tensor([prompt + [pending]])
    hf_assistant.generation_config.num_assistant_tokens = k
    generator = SinglePositionMultiTokenCandidateGenerator(
        hf_assistant, hf_target.get_input_embeddings(), GenerationConfig(max_length=256))
    candidates, logits = generator.get_candidates(
        inputs, {"attention_mask": torch.ones_like(inputs)}, out, False, 0)
    return pending, candidates[0, inputs.shape[1]:].tolist(), logits[0]


def our_draft(proposer, model, prompt: list[int], pending: int, k: int) -> list[int]:
    cache = model.new_cache(1, 64)
    _, hidden = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache,
                      num_logits=0)
    state = DraftState(tokens=[prompt + [pending]], hidden=hidden[:, -1],
                       positions=torch.tensor([len(prompt)]), cache=cache,
                       params=SamplingParams(), generator=None)
    return proposer.propose(state, k).tokens[0].tolist()


@pytest.mark.parametrize("length", [5, 21])  # within and past the 8-token sliding window
def test_drafts_equal_transformers_candidates(pair, length):
    kind, hf_target, hf_assistant, target, folder = pair
    head = load_assistant(folder, target.model, target.weights_hash)
    assert head.cfg.head == ("clustered" if kind == "e2b" else "full")
    proposer = AssistantProposer(head, target.model)
    gen = torch.Generator().manual_seed(length)
    prompt = [2] + torch.randint(3, 512, (length,), generator=gen).tolist()
    pending, theirs, their_logits = transformers_candidates(hf_target, hf_assistant, prompt, K)
    assert our_draft(proposer, target.model, prompt, pending, K) == theirs
    # and the first step's scores agree where ours are defined (theirs mask with min - 1)
    cache = target.model.new_cache(1, 64)
    _, hidden = target.model(torch.tensor([prompt]), torch.arange(length + 1)[None], cache, 0)
    kv = [(cache.k[layer, :1, :, :length + 1], cache.v[layer, :1, :, :length + 1])
          for layer in head.cfg.target_layers]
    embeds = target.model.embed_tokens(torch.tensor([[pending]]))
    _, x = head.step_states(embeds, hidden[:, -1:], torch.tensor([[length + 1]]),
                            torch.tensor([[length + 1]]), kv)
    logits, ids = proposer.logits(x[:, 0])
    full = proposer.logits.to_full(logits, ids)[0]
    finite = torch.isfinite(full)
    torch.testing.assert_close(full[finite], their_logits[0][finite], atol=1e-4, rtol=1e-4)


def test_greedy_speculation_equals_transformers_greedy(pair):
    _, hf_target, _, target, folder = pair
    built = make_proposer("mtp-only", target, ProposerRequest(drafter_path=folder))
    assert isinstance(built.proposer, AssistantProposer)
    prompt = [2, 10, 20, 30, 40, 10, 20, 30, 40, 10, 20, 30, 77, 78]
    options = GenerateOptions(max_new_tokens=24, ignore_eos=True, draft_k=4)
    out = Engine(target.model, proposer=built.proposer).generate([prompt], options)[0]
    assert out.token_ids == hf_greedy(hf_target, prompt, 24)
    hybrid = make_proposer("mtp", target, ProposerRequest(drafter_path=folder)).proposer
    assert Engine(target.model, proposer=hybrid).generate([prompt], options)[0].token_ids == \
        out.token_ids


def test_saved_in_the_assistant_layout_loads_back_into_transformers(pair, tmp_path):
    from transformers import Gemma4AssistantForCausalLM

    kind, hf_target, hf_assistant, target, folder = pair
    head = load_assistant(folder, target.model)
    save_assistant(head, tmp_path / "export")
    back = Gemma4AssistantForCausalLM.from_pretrained(tmp_path / "export").eval()
    theirs, ours = hf_assistant.state_dict(), back.state_dict()
    assert theirs.keys() == ours.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=0, msg=name)
    again = load_assistant(tmp_path / "export", target.model)
    prompt = [2, 9, 8, 7, 6, 5]
    pending, candidates, _ = transformers_candidates(hf_target, back, prompt, K)
    assert our_draft(AssistantProposer(again, target.model), target.model, prompt, pending,
                     K) == candidates


@pytest.mark.parametrize("change, message", [
    ({"backbone": 48}, "backbone_hidden_size 48 != target's hidden size 64"),
    ({"vocab": 256}, "vocabulary 256 != target's 512"),
])
def test_a_drafter_that_does_not_fit_is_refused(pair, tmp_path, change, message):
    kind, _, _, target, _ = pair
    gemma4_assistant(kind, **change).save_pretrained(tmp_path / "bad")
    with pytest.raises(SpecError, match=message):
        make_proposer("mtp-only", target, ProposerRequest(drafter_path=tmp_path / "bad"))


def test_cli_generate_with_an_assistant(pair, capsys):
    from mtpspec.cli import main

    _, _, _, target, folder = pair
    code = main(["generate", "hello", "--model", str(target.source), "--drafter", str(folder),
                 "--max-new-tokens", "8", "--weights", "fp32", "--spec", "mtp-only"])
    assert code in (0, None)
    assert capsys.readouterr().out


# --- training in the assistant layout, and exporting it -------------------------------------------

TRAIN_ARGS = ["--num-prompts", "6", "--eval-prompts", "2", "--max-new-tokens", "16",
              "--gen-batch", "4", "--steps", "3", "--batch-size", "2", "--seq-len", "24",
              "--unroll", "2", "--d-draft", "32", "--layers", "3", "--heads", "4",
              "--intermediate", "64", "--clusters", "16", "--top-clusters", "4",
              "--eval-every", "3"]


def prompt_ids_file(folder) -> str:
    gen = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(3, 500, (6,), generator=gen).tolist() for _ in range(8)]
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return str(folder / "prompts.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``mtpspec train --layout gemma4-assistant`` on the tiny E2B target:
    (HF target, our Target, the --out folder)."""
    from mtpspec.cli import main

    root = tmp_path_factory.mktemp("train")
    hf_target = gemma4_target("e2b")
    folder = save_with_tokenizer(hf_target, root / "target")
    code = main(["train", "--model", str(folder), "--out", str(root / "out"), "--layout",
                 "gemma4-assistant", "--prompt-ids", prompt_ids_file(root), *TRAIN_ARGS])
    assert code in (0, None)
    return hf_target, load_target(folder, "fp32"), root / "out"


@pytest.mark.parametrize("length", [5, 21])  # within and past the 8-token sliding window
def test_a_trained_assistant_exports_what_transformers_drafts(trained, length):
    from transformers import Gemma4AssistantForCausalLM

    hf_target, target, out = trained
    back = Gemma4AssistantForCausalLM.from_pretrained(out / "assistant",  # bf16 weights
                                                      dtype=torch.float32).eval()
    ours = load_assistant(out / "assistant", target.model, target.weights_hash)
    checkpoint = load_drafter(out, target.config, target.weights_hash, target.model.kv_shape)
    assert ours.cfg == checkpoint.cfg  # the exported layout reproduces the trained config
    assert ours.cfg.head == "clustered" and ours.cfg.target_hash == target.weights_hash
    for name, value in checkpoint.state_dict().items():  # and its weights (both bf16)
        torch.testing.assert_close(ours.state_dict()[name], value, atol=0, rtol=0, msg=name)
    proposer = AssistantProposer(ours, target.model)
    gen = torch.Generator().manual_seed(length)
    prompt = [2] + torch.randint(3, 512, (length,), generator=gen).tolist()
    pending, theirs, their_logits = transformers_candidates(hf_target, back, prompt, K)
    assert our_draft(proposer, target.model, prompt, pending, K) == theirs
    cache = target.model.new_cache(1, 64)
    _, hidden = target.model(torch.tensor([prompt]), torch.arange(length + 1)[None], cache, 0)
    kv = [(cache.k[layer, :1, :, :length + 1], cache.v[layer, :1, :, :length + 1])
          for layer in ours.cfg.target_layers]
    _, x = ours.step_states(target.model.embed_tokens(torch.tensor([[pending]])), hidden[:, -1:],
                            torch.tensor([[length + 1]]), torch.tensor([[length + 1]]), kv)
    full = proposer.logits.to_full(*proposer.logits(x[:, 0]))[0]
    finite = torch.isfinite(full)
    assert int(finite.sum()) == 4 * 512 // 16  # the top clusters' tokens
    torch.testing.assert_close(full[finite], their_logits[0][finite], atol=1e-4, rtol=1e-4)


def test_a_trained_assistant_speculates_losslessly(trained):
    hf_target, target, out = trained
    prompt = [2, 10, 20, 30, 40, 10, 20, 30, 40, 10, 20, 30, 77, 78]
    options = GenerateOptions(max_new_tokens=24, ignore_eos=True, draft_k=4)
    reference = hf_greedy(hf_target, prompt, 24)
    for folder in (out / "assistant", out):  # the export, and the trainer's own checkpoint
        built = make_proposer("mtp-only", target, ProposerRequest(drafter_path=folder))
        assert isinstance(built.proposer, AssistantProposer)
        spec = Engine(target.model, proposer=built.proposer).generate([prompt], options)[0]
        assert spec.token_ids == reference, folder
    assert set(json.loads((out / "eval.json").read_text())) == {"clustered", "full"}


def test_training_updates_the_own_lm_head(tmp_path):
    """The trainer's loss reaches every part of an assistant-layout head: its own embedding, the
    centroids, the layers; the target stays frozen."""
    from mtpspec.drafter.gemma4_assistant import init_own_lm_head
    from mtpspec.drafter.head import init_weights
    from mtpspec.drafter.train import TrainConfig, train
    from mtpspec.models.hf import HFModel

    target = HFModel(gemma4_target("e2b"))
    head = MTPHead(new_assistant_config(target, d_draft=32, num_layers=2, intermediate_size=64,
                                        num_centroids=16, top_centroids=4))
    init_weights(head, 0)
    init_own_lm_head(head, target.embed.dequantized())
    before = {name: value.clone() for name, value in head.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, 512, (20,), generator=gen).tolist() for _ in range(4)]
    config = TrainConfig(steps=2, batch_size=2, seq_len=20, unroll=2, warmup=1, lr=1e-2,
                         eval_every=10, save_every=10)
    assert train(head, target, sequences, config, tmp_path, log=lambda line: None)["steps"] == 2
    after = head.state_dict()
    for name in ("embedding", "centroids", "pre_projection.weight", "layers.0.q_proj.weight",
                 "layers.1.post_mlp_norm.weight", "post_projection.weight"):
        assert not torch.equal(after[name], before[name]), name
    assert torch.equal(after["token_ordering"], before["token_ordering"])


def assert_one_error_line(err: str, fragment: str) -> str:
    """One ``mtpspec: error:`` line, the last (transformers' loading bars may come before it)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("mtpspec: error: ")]
    assert errors == lines[-1:] and fragment in errors[0], err
    assert "Traceback" not in err
    return errors[0]


def test_the_assistant_layout_needs_a_gemma4_target(tmp_path, capsys):
    from mtpspec.cli import main

    folder = save_with_tokenizer(llama_like("qwen3"), tmp_path / "qwen")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", str(folder), "--out", str(tmp_path / "out"), "--layout",
              "gemma4-assistant", "--prompt-ids", prompt_ids_file(tmp_path), *TRAIN_ARGS])
    assert exit_.value.code == 2
    assert_one_error_line(capsys.readouterr().err,
                          "the gemma4-assistant layout needs a Gemma 4 target; qwen is qwen3")
    assert not (tmp_path / "out").exists()  # refused before any work


# --- drafters that do not fit ---------------------------------------------------------------------

def fake_target(kinds=tuple(LAYER_TYPES), sliding=(1, 16), full=(1, 32)):
    """Just what the fit checks read of a target: sizes, layer types, K/V producers and shapes."""
    shapes = {"sliding_attention": sliding, "full_attention": full}
    config = SimpleNamespace(hidden_size=64, vocab_size=512, name="fake", head_dim=16,
                             num_layers=len(kinds))
    return SimpleNamespace(config=config, layer_kinds=list(kinds),
                           kv_source=list(range(len(kinds))),
                           kv_shape=lambda layer: shapes[kinds[layer]])


@pytest.mark.parametrize("target, raw_change, message", [
    (fake_target(), {}, None),
    (fake_target(sliding=(1, 8)), {}, "sliding_attention head size 16 != target layer 4's 8"),
    (fake_target(full=(1, 64)), {}, "full_attention head size 32 != target layer 5's 64"),
    (fake_target(full=(3, 32)), {}, "4 query heads do not group over target layer 5's 3 kv heads"),
    (fake_target(kinds=["full_attention"] * 3), {},
     "its layers read target layers of type ['sliding_attention'], which the target lacks"),
    (fake_target(), {"backbone_hidden_size": 96}, "backbone_hidden_size 96 != target's hidden "
                                                  "size 64"),
    (fake_target(), {"vocab_size": 1024}, "vocabulary 1024 != target's 512"),
    (fake_target(), {"mtpspec": {"target_hash": "a" * 64, "target_name": "other"}},
     "it was trained for target weights aaaaaaaaaaaa (other), not bbbbbbbbbbbb"),
], ids=["fits", "sliding-size", "global-size", "kv-groups", "layer-type", "backbone", "vocabulary",
        "hash"])
def test_assistant_mismatches_are_named(target, raw_change, message):
    raw = assistant_config_of("e2b").to_dict()
    if "vocab_size" in raw_change:
        raw["text_config"]["vocab_size"] = raw_change["vocab_size"]
    else:
        raw.update(raw_change)
    if message is None:
        assert assistant_config(raw, target, "b" * 64).target_layers == (4, 4, 5)
        return
    with pytest.raises(DrafterMismatchError) as err:
        assistant_config(raw, target, "b" * 64)
    assert str(err.value) == f"assistant does not fit this target: {message}"


@pytest.mark.parametrize("change, message", [
    ({}, None),
    ({"head": "frequency"}, "an assistant's LM head is clustered or full, not 'frequency'"),
    ({"num_centroids": 24}, "24 clusters do not divide the target's vocabulary of 512"),
    ({"top_centroids": 32}, "top clusters 32 not in 1..16"),
])
def test_a_new_assistant_layout_is_checked(change, message):
    target = fake_target()
    target.text_config = SimpleNamespace(model_type="gemma4_text", sliding_window=8,
                                         rms_norm_eps=1e-6, rope_parameters={})
    sizes = {"d_draft": 32, "num_layers": 3, "num_centroids": 16, "top_centroids": 4, **change}
    if message is None:
        cfg = new_assistant_config(target, **sizes)
        assert cfg.target_layers == (4, 4, 5) and cfg.layer_head_dims == (16, 16, 32)
        assert cfg.sliding_window == 8 + 2 and cfg.lm_head_source == "draft"
        return
    with pytest.raises(DrafterMismatchError) as err:
        new_assistant_config(target, **sizes)
    assert str(err.value) == message


def test_our_checkpoint_mismatches_on_a_gemma4_target_are_named(pair, tmp_path):
    """A drafter in our format for an HF Gemma 4 target: layers out of range, or a draft layer
    whose attention does not fit the K/V of the target layer it reads (the global layers are
    wider), are refused by name before any weight is read."""
    kind, _, _, target, _ = pair
    model = target.model
    cfg = DrafterConfig.for_target(target.config, num_layers=2, kv_shape=model.kv_shape,
                                   d_draft=32, intermediate_size=64, num_clusters=8,
                                   top_clusters=2, target_hash=target.weights_hash)
    save_drafter(MTPHead(cfg), tmp_path)
    load_drafter(tmp_path, target.config, target.weights_hash, model.kv_shape)  # it fits
    meta = json.loads((tmp_path / "drafter.json").read_text())
    heads, size = model.kv_shape(cfg.target_layers[1])
    for change, message in [
        ({"target_layers": [4, 9]}, "target layers [9] do not exist (target has 6)"),
        ({"layer_head_dims": [16, 16]},
         f"draft layer 1 expects {heads} kv heads of size 16, target layer "
         f"{cfg.target_layers[1]} has {heads} of size {size}"),
    ]:
        (tmp_path / "drafter.json").write_text(json.dumps(
            {**meta, "config": {**meta["config"], **change}}))
        with pytest.raises(SpecError) as err:
            make_proposer("mtp-only", target, ProposerRequest(drafter_path=tmp_path))
        assert message in str(err.value)


def test_cli_refuses_a_misfit_assistant_in_one_line(pair, tmp_path, capsys):
    from mtpspec.cli import main

    kind, _, _, target, _ = pair
    gemma4_assistant(kind, backbone=48).save_pretrained(tmp_path / "bad")
    capsys.readouterr()  # transformers' progress bars
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "hello", "--model", str(target.source), "--drafter",
              str(tmp_path / "bad"), "--weights", "fp32", "--max-new-tokens", "4"])
    assert exit_.value.code == 2
    line = assert_one_error_line(capsys.readouterr().err,
                                 "backbone_hidden_size 48 != target's hidden size 64")
    assert line.startswith(f"mtpspec: error: --drafter {tmp_path / 'bad'}: assistant does not fit")
