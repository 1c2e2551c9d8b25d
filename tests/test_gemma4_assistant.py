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

import pytest
import torch

pytest.importorskip("transformers")

from mtpspec.drafter.gemma4_assistant import load_assistant, save_assistant  # noqa: E402
from mtpspec.engine import Engine, GenerateOptions  # noqa: E402
from mtpspec.proposers.assistant import AssistantProposer  # noqa: E402
from mtpspec.proposers.base import DraftState  # noqa: E402
from mtpspec.proposers.factory import ProposerRequest, SpecError, make_proposer  # noqa: E402
from mtpspec.runtime import load_target  # noqa: E402
from mtpspec.sampling import SamplingParams  # noqa: E402

from tiny_gemma4 import (gemma4_assistant, gemma4_target, hf_greedy,  # noqa: E402
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
