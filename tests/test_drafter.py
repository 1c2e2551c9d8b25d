"""Tests for the MTP drafter: a frozen target, seeded and resumable training, checkpoints and their
mismatch errors, the vocabulary layouts, the clustered LM head, lossless speculative decoding with
the MTP proposer (greedy equality and a distribution test for sampling), and ``evaluate``.

Tiny random targets: ``fmt="dense"`` for training (autograd-friendly), the packed fp32 model for
inference. The shared head is trained for a few dozen steps so that its drafts are sometimes
accepted and sometimes rejected: both paths of verification get exercised. The proposer tests run
the fused C++ draft step (the default on a packed CPU target) and the Python reference alike.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mtpspec.config import tiny_config
from mtpspec.drafter import checkpoint
from mtpspec.drafter import train as train_module
from mtpspec.drafter.checkpoint import DrafterMismatchError, load_drafter, read_config, save_drafter
from mtpspec.drafter.clusters import balanced_kmeans, frequent_tokens
from mtpspec.drafter.data import generate_batch, generate_states
from mtpspec.drafter.head import HEAD_KINDS, DrafterConfig, MTPHead, init_weights
from mtpspec.drafter.train import TrainConfig, evaluate, train
from mtpspec.engine import BatchSession, Engine, FinishEvent, GenerateOptions
from mtpspec.proposers.base import DraftState
from mtpspec.proposers.factory import ProposerRequest, SpecError, make_proposer
from mtpspec.proposers.mtp import DraftHeadLogits, MTPProposer
from mtpspec.runtime import Target
from mtpspec.sampling import SamplingParams, logits_to_probs, make_generator

from conftest import tiny_model

MAX_K = 6



def quiet(*_args) -> None:
    pass


@pytest.fixture(scope="module")
def dense():
    return tiny_model(fmt="dense")  # the training target


@pytest.fixture(scope="module")
def target():
    return tiny_model()  # the same weights, packed for inference


def drafter_config(model_config, **overrides) -> DrafterConfig:
    settings = dict(num_layers=2, d_draft=32, intermediate_size=64, num_clusters=8,
                    top_clusters=2, frequency_vocab=64)
    return DrafterConfig.for_target(model_config, **{**settings, **overrides})


@pytest.fixture(scope="module")
def sequences(dense):
    """Target-greedy continuations of short random prompts (self-distillation data)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(3, 512, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 8, (16,), generator=gen)]
    return [p + r for p, r in zip(prompts, generate_batch(dense, prompts, 32, SamplingParams()))]


def fresh_head(dense, sequences, seed: int = 0, **overrides) -> MTPHead:
    head = MTPHead(drafter_config(dense.config, **overrides))
    init_weights(head, seed)
    ordering, centroids = balanced_kmeans(dense.embed.dequantized(), head.cfg.num_clusters, seed=seed)
    head.init_from_kmeans(ordering, centroids, frequent_tokens(sequences, head.cfg.vocab_size,
                                                               head.cfg.frequency_vocab))
    return head


def small_run(steps: int, **overrides) -> TrainConfig:
    settings = dict(steps=steps, batch_size=2, seq_len=32, unroll=2, top_k=8, lr=1e-2, warmup=1,
                    eval_every=1000, save_every=1000, loss_chunk=64)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def trained_head(dense, sequences, tmp_path_factory):
    head = fresh_head(dense, sequences)
    train(head, dense, sequences, small_run(30, batch_size=4, seq_len=48, unroll=3),
          tmp_path_factory.mktemp("trained"), log=quiet)
    return head.eval()


def with_config(head: MTPHead, **changes) -> MTPHead:
    """A copy of ``head`` with its weights and a changed config."""
    other = MTPHead(replace(head.cfg, **changes))
    other.load_state_dict(head.state_dict())
    return other.eval()


def assert_same_weights(a: MTPHead, b: MTPHead, atol: float = 0.0) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], atol=atol, rtol=0, msg=name)


# --- training ------------------------------------------------------------------------------------

def tensor_hashes(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every parameter and buffer, by name (independent of the trainer's own hash)."""
    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def test_training_changes_the_head_and_never_the_target(dense, sequences, tmp_path):
    before = tensor_hashes(dense)
    assert before  # the dense model holds its weights as buffers
    head = fresh_head(dense, sequences)
    start = {name: value.clone() for name, value in head.state_dict().items()}
    train(head, dense, sequences, small_run(3), tmp_path, log=quiet)
    assert tensor_hashes(dense) == before
    for name, tensor in [*dense.named_parameters(), *dense.named_buffers()]:
        assert not tensor.requires_grad and tensor.grad is None, name
    changed = [name for name, value in head.state_dict().items()
               if value.is_floating_point() and not torch.equal(value, start[name])]
    assert "pre_projection.weight" in changed and "centroids" in changed
    assert len(changed) >= len(list(head.parameters())) // 2


def test_recorded_states_are_what_a_target_pass_computes(target):
    """The states kept while the packed target writes responses (``--gen-weights``) equal a fresh
    pass of the same target over the finished sequences, up to their fp16 storage."""
    prompts = [[2, 17, 40, 99], [2, 5], [2, 300, 301, 302, 303, 304]]
    layers = (1, 3)
    states = generate_states(target, prompts, 12, SamplingParams(), None, layers, top_k=8)
    # the states cover the tokens the target ran on: the prompt and the response, less a last
    # token that ended the sequence by length (it was emitted, never fed)
    for st, p, r in zip(states, prompts, generate_batch(target, prompts, 12, SamplingParams())):
        assert st.ids == (p + r)[:len(st)] and len(st) >= len(p) + len(r) - 1
    ids, valid, hidden, cache, probs, tops, known = train_module.stored_pass(
        states, max(len(st) for st in states), layers, "cpu")
    fresh_hidden, fresh_cache, fresh_probs, fresh_tops = train_module.target_pass(target, ids, 8)
    for b, st in enumerate(states):
        n = len(st)
        assert known[b].tolist() == [st.known_from <= t < n for t in range(ids.shape[1])]
        torch.testing.assert_close(hidden[b, :n], fresh_hidden[b, :n], atol=2e-2, rtol=1e-2)
        for layer in layers:
            torch.testing.assert_close(cache.k[layer, b, :, :n], fresh_cache.k[layer, b, :, :n],
                                       atol=2e-2, rtol=1e-2)
            torch.testing.assert_close(cache.v[layer, b, :, :n], fresh_cache.v[layer, b, :, :n],
                                       atol=2e-2, rtol=1e-2)
        at = known[b]
        assert torch.equal(tops[b, at, 0], fresh_tops[b, at, 0])  # the target's greedy token
        torch.testing.assert_close(probs[b, at], fresh_probs[b, at], atol=2e-3, rtol=0)


def test_training_from_recorded_states_leaves_the_target_alone(target, sequences, tmp_path):
    """The CPU recipe trains from ``TargetStates`` with the packed target itself as the target."""
    prompts = [seq[:4] for seq in sequences[:6]]
    states = generate_states(target, prompts, 20, SamplingParams(), None,
                             drafter_config(target.config).target_layers, top_k=8)
    before = tensor_hashes(target)
    head = fresh_head(target, [st.ids for st in states])
    start = head.pre_projection.weight.clone()
    train(head, target, states, small_run(3), tmp_path, log=quiet)
    assert tensor_hashes(target) == before
    assert not torch.equal(head.pre_projection.weight, start)


def test_sampled_softmax_loss_equals_the_full_one_over_the_whole_vocabulary(dense, sequences,
                                                                           tmp_path):
    """A loss vocabulary of every token (all of them in the frequent list) is the full softmax:
    the same training; a smaller one trains too (the CPU recipe's budget)."""
    vocab = dense.config.vocab_size
    full, every, some = (fresh_head(dense, sequences, frequency_vocab=vocab) for _ in range(3))
    assert full.frequent_tokens.numel() == vocab
    train(full, dense, sequences, small_run(2), tmp_path / "full", log=quiet)
    train(every, dense, sequences, replace(small_run(2), loss_vocab=vocab), tmp_path / "every",
          log=quiet)
    assert_same_weights(full, every, atol=1e-5)
    start = some.pre_projection.weight.clone()
    train(some, dense, sequences, replace(small_run(2), loss_vocab=vocab // 8), tmp_path / "some",
          log=quiet)
    assert not torch.equal(some.pre_projection.weight, start)
    assert all(torch.isfinite(p).all() for p in some.parameters())


def test_training_is_deterministic_with_a_seed(dense, sequences, tmp_path):
    first, second = fresh_head(dense, sequences), fresh_head(dense, sequences)
    train(first, dense, sequences, small_run(3), tmp_path / "a", log=quiet)
    train(second, dense, sequences, small_run(3), tmp_path / "b", log=quiet)
    assert_same_weights(first, second)


class Interrupted(Exception):
    """Stands for the process dying right after a checkpoint was written."""


def test_training_resumes_from_its_checkpoint(dense, sequences, tmp_path, monkeypatch):
    config = small_run(4, save_every=2)
    straight = fresh_head(dense, sequences)
    train(straight, dense, sequences, config, tmp_path / "straight", log=quiet)

    save = train_module._save

    def save_then_die(*args):
        save(*args)
        raise Interrupted

    monkeypatch.setattr(train_module, "_save", save_then_die)
    with pytest.raises(Interrupted):
        train(fresh_head(dense, sequences), dense, sequences, config, tmp_path / "resumed", log=quiet)
    monkeypatch.undo()
    # a new process: a differently initialized head, whose state comes from the checkpoint
    resumed, logs = fresh_head(dense, sequences, seed=7), []
    result = train(resumed, dense, sequences, config, tmp_path / "resumed", log=logs.append)
    assert "resumed from step 2" in logs and result["steps"] == 4
    assert_same_weights(resumed, straight, atol=1e-6)
    saved = load_drafter(tmp_path / "resumed", dense.config)
    assert_same_weights(saved, with_config(straight).to(torch.bfloat16).float(), atol=1e-6)


# --- checkpoints ---------------------------------------------------------------------------------

def test_checkpoint_round_trip(trained_head, target, tmp_path):
    save_drafter(trained_head, tmp_path / "f32", extra={"note": "x"}, dtype=torch.float32)
    loaded = load_drafter(tmp_path / "f32", target.config, "any-hash")
    assert loaded.cfg == trained_head.cfg and not loaded.training
    assert_same_weights(loaded, trained_head)
    assert read_config(tmp_path / "f32")[1]["note"] == "x"
    # the default stores floats in bfloat16 and integer buffers exactly
    save_drafter(trained_head, tmp_path / "bf16")
    assert_same_weights(load_drafter(tmp_path / "bf16"),
                        with_config(trained_head).to(torch.bfloat16).float())


def test_sharded_checkpoint_round_trip(trained_head, tmp_path, monkeypatch):
    folder = tmp_path / "drafter"
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 8 << 10)
    save_drafter(trained_head, folder, dtype=torch.float32)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2
    assert shards == [f"drafter-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    assert_same_weights(load_drafter(folder), trained_head)
    monkeypatch.undo()
    save_drafter(trained_head, folder, dtype=torch.float32)  # stale shards must not survive
    assert [p.name for p in folder.glob("*.safetensors")] == ["drafter.safetensors"]
    assert_same_weights(load_drafter(folder), trained_head)


@pytest.mark.parametrize("target_config, weights_hash, message", [
    (tiny_config(), "b" * 64, "trained for target weights aaaaaaaaaaaa (tiny-gemma3), not bbbbbbbbbbbb"),
    (tiny_config(hidden_size=32), "a" * 64, "hidden size 64 != target's 32"),
    (tiny_config(vocab_size=256), "a" * 64, "vocabulary 512 != target's 256"),
    (tiny_config(num_layers=2), "a" * 64, "target layers [2, 3] do not exist (target has 2)"),
], ids=["hash", "hidden", "vocabulary", "layers"])
def test_loading_onto_the_wrong_target_names_the_mismatch(tmp_path, target_config, weights_hash,
                                                          message):
    head = MTPHead(drafter_config(tiny_config(), target_hash="a" * 64))
    save_drafter(head, tmp_path)
    load_drafter(tmp_path, tiny_config(), "a" * 64)  # the right target loads
    with pytest.raises(DrafterMismatchError) as err:
        load_drafter(tmp_path, target_config, weights_hash)
    assert message in str(err.value)


def test_a_token_ordering_that_is_not_a_permutation_is_refused(tmp_path):
    head = MTPHead(drafter_config(tiny_config()))
    with torch.no_grad():
        head.token_ordering[3] = head.token_ordering[4]  # a duplicated entry hides token 3
    save_drafter(head, tmp_path)
    with pytest.raises(DrafterMismatchError, match="not a permutation"):
        load_drafter(tmp_path)


def test_mismatch_reaches_the_user_as_a_spec_error(tmp_path, target):
    save_drafter(MTPHead(drafter_config(target.config, target_hash="a" * 64)), tmp_path / "d")
    other = Target(model=target, tokenizer=None, config=target.config, source=Path("tiny.gguf"),
                   weights_hash="b" * 64, weight_format="fp32", load_s=0.0)
    with pytest.raises(SpecError, match="trained for target weights aaaaaaaaaaaa"):
        make_proposer("mtp", other, ProposerRequest(drafter_path=tmp_path / "d"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DrafterMismatchError, match="not an mtpspec drafter folder"):
        load_drafter(tmp_path / "empty")


# --- vocabulary layouts and the clustered head ----------------------------------------------------

def test_balanced_kmeans_is_a_permutation_into_equal_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    group = torch.randperm(512, generator=gen) % 8  # 8 equal groups of similar rows
    rows = centers[group] * (1 + torch.rand(512, 1, generator=gen)) + 0.05 * torch.randn(512, 16,
                                                                                         generator=gen)
    ordering, centroids = balanced_kmeans(rows, 8)
    assert ordering.dtype == torch.int64 and torch.equal(ordering.sort().values, torch.arange(512))
    members = ordering.view(8, 64)  # cluster c holds tokens members[c]: exactly 64 each
    assert centroids.shape == (8, 16)
    torch.testing.assert_close(centroids, rows[members].mean(1))
    # similar rows end up together far more often than in a random split (about 0.25 here)
    purity = sum(int(torch.bincount(group[m], minlength=8).max()) for m in members) / 512
    assert purity > 0.6
    assert torch.equal(balanced_kmeans(rows, 8)[0], ordering)  # seeded
    with pytest.raises(ValueError, match="not a multiple of 7 clusters"):
        balanced_kmeans(rows, 7)


def test_frequent_tokens_ranks_by_count():
    lists = [[5, 5, 5, 7, 7, 9], [7, 3, 3, 5], [9, 0]]  # counts: 5:4 7:3 3:2 9:2 0:1
    assert frequent_tokens(lists, 10, 1).tolist() == [5]
    assert frequent_tokens(lists, 10, 2).tolist() == [5, 7]
    assert frequent_tokens(lists, 10, 3).tolist() == [3, 5, 7]  # a tie goes to the lower id
    assert frequent_tokens(lists, 10, 5).tolist() == [0, 3, 5, 7, 9]
    assert frequent_tokens(lists, 10, 5).dtype == torch.int64


def test_clustered_head_scores_exactly_the_top_clusters(trained_head, target):
    cfg = trained_head.cfg
    h = torch.randn(5, cfg.target_hidden, generator=torch.Generator().manual_seed(0))  # [B, d]
    emb = target.embed.dequantized()  # [V, d] the tied head
    head_logits = DraftHeadLogits(trained_head, target, "clustered")
    logits, ids = head_logits(h)  # [B, m*S] each
    clusters = trained_head.token_ordering.view(cfg.num_clusters, -1)  # [C, S]
    chosen = (h @ trained_head.centroids.detach().T).topk(cfg.top_clusters).indices  # [B, m]
    for b in range(len(h)):
        assert sorted(ids[b].tolist()) == sorted(clusters[chosen[b]].flatten().tolist())
    torch.testing.assert_close(logits, (h @ emb.T).gather(1, ids))
    full = head_logits.to_full(logits, ids)  # [B, V]
    scored = torch.zeros_like(full, dtype=torch.bool).scatter_(1, ids, True)
    assert bool((full[~scored] == float("-inf")).all()) and bool(full[scored].isfinite().all())
    assert torch.equal(full.gather(1, ids), logits)
    # with every cluster chosen the clustered head is the full head
    every = with_config(trained_head, top_clusters=cfg.num_clusters)
    logits, ids = DraftHeadLogits(every, target, "clustered")(h)
    exact, none = DraftHeadLogits(trained_head, target, "full")(h)
    assert none is None
    torch.testing.assert_close(DraftHeadLogits(every, target).to_full(logits, ids), exact)
    torch.testing.assert_close(exact, h @ emb.T)
    logits, ids = DraftHeadLogits(trained_head, target, "frequency")(h)
    assert torch.equal(ids[0], trained_head.frequent_tokens) and ids.shape == (5, 64)
    torch.testing.assert_close(logits, (h @ emb.T)[:, trained_head.frequent_tokens])


# --- lossless speculative decoding with the MTP proposer -----------------------------------------

@pytest.fixture(scope="module")
def plain_greedy(target):
    # ragged: lengths 7, 2 and 13 (beyond the sliding window of 8)
    prompts = [[2, 17, 33, 17, 33, 17, 33], [2, 400], [2, 5, 9, 11, 300] * 2 + [5, 9, 11]]
    options = GenerateOptions(max_new_tokens=20, ignore_eos=True)
    return prompts, [Engine(target).generate([p], options)[0].token_ids for p in prompts]


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "python"])
@pytest.mark.parametrize("constant_positions", [True, False])
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_mtp_greedy_speculative_equals_plain(target, trained_head, plain_greedy, kind,
                                             constant_positions, use_fused):
    prompts, expected = plain_greedy
    head = with_config(trained_head, constant_positions=constant_positions)
    proposer = MTPProposer(head, target, kind, use_fused=use_fused)
    assert (proposer.fused is not None) == use_fused  # the packed CPU target takes the C++ step
    engine = Engine(target, proposer=proposer, policy=False)  # drafts every step
    accepted = drafted = 0
    for k in (1, 2, 4, 6):
        options = GenerateOptions(max_new_tokens=20, ignore_eos=True, draft_k=k)
        assert engine.generate(prompts[:1], options)[0].token_ids == expected[0], k
        batch = engine.generate(prompts, options)
        assert [r.token_ids for r in batch] == expected, k
        accepted += sum(r.stats.draft_accepted for r in batch)
        drafted += sum(r.stats.draft_proposed for r in batch)
    assert 0 < accepted < drafted  # both verification paths ran


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "python"])
def test_confidence_stop_is_lossless_and_shortens_drafts(target, trained_head, plain_greedy,
                                                         use_fused):
    """The tiny head is unsure of itself: these thresholds stop drafts after 0, 1 or more steps."""
    prompts, expected = plain_greedy
    drafts = []
    for threshold in (0.004, 0.02, 0.1):
        proposer = Recording(MTPProposer(trained_head, target, "clustered", use_fused=use_fused,
                                         min_confidence=threshold))
        engine = Engine(target, proposer=proposer)
        for k in (2, 6):
            options = GenerateOptions(max_new_tokens=20, ignore_eos=True, draft_k=k)
            assert [r.token_ids for r in engine.generate(prompts, options)] == expected, k
            assert engine.generate(prompts[1:2], options)[0].token_ids == expected[1], k
        drafts += proposer.drafts
    lengths = {int(d.num_drafts.max()) if d.num_drafts is not None else d.k for d in drafts}
    assert 0 in lengths and len(lengths) >= 3 and max(lengths) <= 6  # the length really varied
    assert any(d.num_drafts is not None for d in drafts)  # and rows of a batch stopped apart


def test_confidence_threshold_is_checked(target, trained_head):
    for bad in (0.0, 1.0, -0.5, 2):
        with pytest.raises(ValueError, match="min_confidence"):
            MTPProposer(trained_head, target, min_confidence=bad)


class Recording:
    """Wraps a proposer and keeps every Draft it returns."""

    def __init__(self, inner):
        self.inner, self.name, self.drafts = inner, inner.name, []

    def reset(self) -> None:
        self.inner.reset()

    def propose(self, state, k):
        draft = self.inner.propose(state, k)
        self.drafts.append(draft)
        return draft


def next_token_probs(model, prefixes: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """The target's next-token distribution after each of equally long prefixes: [N, V]."""
    ids = torch.tensor(prefixes)  # [N, T]
    cache = model.new_cache(len(prefixes), ids.shape[1])
    logits, _ = model(ids, torch.arange(ids.shape[1]).expand(len(prefixes), -1), cache)
    return logits_to_probs(logits[:, -1], params)


@pytest.mark.parametrize("temperature,top_p,use_fused,min_confidence", [
    (1.0, 1.0, True, None), (0.7, 0.9, True, None), (0.7, 0.9, False, None), (1.0, 1.0, True, 0.2)])
def test_mtp_sampling_keeps_the_target_distribution(temperature, top_p, use_fused, min_confidence):
    """Tokens 2 and 3 come from the first draft-and-verify step (token 1 from the prefill)."""
    vocab = 12
    target = tiny_model(seed=5, vocab_size=vocab)
    cfg = DrafterConfig.for_target(target.config, num_layers=2, d_draft=32, intermediate_size=64,
                                   num_clusters=4, top_clusters=2, frequency_vocab=6)
    head = MTPHead(cfg)
    init_weights(head, seed=3)
    ordering = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))  # 4 clusters of 3
    rows = target.embed.dequantized()[ordering].view(cfg.num_clusters, -1, cfg.target_hidden)
    head.init_from_kmeans(ordering, rows.mean(1))
    prompt = [2, 5, 7, 3]
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=11)
    # exact joint distribution of tokens 2 and 3, marginal over token 1
    p1 = next_token_probs(target, [prompt], params)[0]  # [V]
    p2 = next_token_probs(target, [prompt + [a] for a in range(vocab)], params)  # [V, V]
    p3 = next_token_probs(target, [prompt + [a, b] for a in range(vocab) for b in range(vocab)],
                          params).view(vocab, vocab, vocab)
    expected = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten()  # [V*V]
    proposer = Recording(MTPProposer(head, target, "clustered", use_fused=use_fused,
                                     min_confidence=min_confidence))
    trials = 6000
    options = GenerateOptions(max_new_tokens=4, sampling=params, ignore_eos=True, draft_k=2)
    # one shared generator: rejection sampling against the head's own q (Engine.generate would
    # give each row its own seed and verify point-mass drafts); no policy: it drafts every step
    session = BatchSession(target, None, proposer, trials, 16, 2, policy=False)
    shared = make_generator(params)
    for _ in range(trials):
        session.add(prompt, options, shared)
    done = {}
    while not session.idle:
        done.update((e.row, e.result) for e in session.step() if isinstance(e, FinishEvent))
    results = [done[j] for j in range(trials)]
    counts = torch.zeros(vocab * vocab)
    for r in results:
        counts[r.token_ids[1] * vocab + r.token_ids[2]] += 1
    keep = expected * trials >= 5
    chi2 = (((counts - expected * trials) ** 2) / (expected * trials).clamp(min=1e-9))[keep].sum()
    dof = int(keep.sum()) - 1
    # mean dof, sd sqrt(2 dof): 5 sd above the mean fails only with negligible probability
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (float(chi2), dof)
    assert float(counts[~keep].sum()) <= max(10.0, 3 * float(expected[~keep].sum() * trials))
    # the first step really drafted two tokens, and drafts were both accepted and rejected
    second = sum(r.from_draft[1] for r in results)
    if min_confidence is None:
        assert proposer.drafts[0].k == 2
        assert 0.05 * trials < second < 0.95 * trials
        assert sum(r.from_draft[2] for r in results) > 50
    else:  # the confidence stop cut some drafts short
        assert any(d.k < 2 or d.num_drafts is not None for d in proposer.drafts)
        assert 0.02 * trials < second < 0.95 * trials
    # q is the clustered head's: zero outside the top_clusters chosen clusters
    q = torch.cat([d.probs.reshape(-1, vocab) for d in proposer.drafts])  # [N, V]
    torch.testing.assert_close(q.sum(-1), torch.ones(len(q)))
    cluster_mass = q[:, head.token_ordering].view(len(q), cfg.num_clusters, -1).sum(-1)  # [N, C]
    touched = (cluster_mass > 0).sum(-1)
    assert int(touched.max()) <= cfg.top_clusters and int((q > 0).sum(-1).max()) <= 6
    if top_p == 1.0:
        assert bool((touched == cfg.top_clusters).all())


# --- evaluation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,use_fused", [("clustered", True), ("full", True),
                                            ("clustered", False)])
def test_evaluate_equals_leading_matches_of_the_proposer(target, trained_head, kind, use_fused):
    """evaluate()'s tau@k is 1 + mean(min(leading matches, k)) over every position P of
    target-greedy sequences; recount the matches with the proposer itself, one P at a time."""
    starts = [[2], [7], [100], [311]]
    held_out = [s + r for s, r in zip(starts, generate_batch(target, starts, 24, SamplingParams()))]
    result = evaluate(trained_head, target, held_out, max_k=MAX_K, head_kind=kind)
    proposer = MTPProposer(trained_head, target, kind, use_fused=use_fused)
    runs = []
    for seq in held_out:  # every token after the first is the target's greedy choice
        for p in range(1, len(seq) - MAX_K):
            cache = target.new_cache(1, len(seq))
            _, hidden = target(torch.tensor([seq[:p]]), torch.arange(p)[None], cache, num_logits=0)
            state = DraftState(tokens=[seq[:p + 1]], hidden=hidden[:, -1],
                               positions=torch.tensor([p]), cache=cache, params=SamplingParams(),
                               generator=None)
            draft = proposer.propose(state, MAX_K).tokens[0].tolist()
            matches = 0
            while matches < MAX_K and draft[matches] == seq[p + 1 + matches]:
                matches += 1
            runs.append(matches)
    runs = torch.tensor(runs, dtype=torch.float64)
    assert result["positions"] == len(runs)
    assert sorted(result["tau"]) == list(range(1, MAX_K + 1))
    for k, tau in result["tau"].items():
        assert tau == pytest.approx(1 + float(runs.clamp(max=k).mean()), abs=1e-6)
        assert 1.0 <= tau <= k + 1
    rates = result["acceptance_per_position"]
    assert len(rates) == MAX_K and all(0.0 <= r <= 1.0 for r in rates)
    for i, rate in enumerate(rates):
        reached = float((runs >= i).double().mean())
        if reached > 0:
            assert rate == pytest.approx(float((runs > i).double().mean()) / reached, abs=1e-6)
    assert result["tau"][MAX_K] > 1.0  # the trained head does accept something here


def test_hybrid_proposer_is_lossless_and_uses_both_sources(tiny):
    from mtpspec.drafter.head import DrafterConfig, MTPHead, init_weights
    from mtpspec.engine import Engine, GenerateOptions
    from mtpspec.proposers.hybrid import HybridProposer
    from mtpspec.proposers.mtp import MTPProposer

    cfg = DrafterConfig.for_target(tiny.config, num_layers=2, d_draft=32, intermediate_size=64,
                                   num_clusters=8, top_clusters=2, frequency_vocab=64)
    head = MTPHead(cfg)
    init_weights(head, 0)
    hybrid = HybridProposer(MTPProposer(head, tiny), min_match=2)
    calls = {"mtp": 0}
    inner = hybrid.mtp.propose

    def counted(state, k):
        calls["mtp"] += 1
        return inner(state, k)

    hybrid.mtp.propose = counted
    prompt = [2, 7, 8, 9, 7, 8, 9, 7, 8]
    options = GenerateOptions(max_new_tokens=24, ignore_eos=True, draft_k=3)
    plain = Engine(tiny).generate([prompt], options)[0]
    spec = Engine(tiny, proposer=hybrid, policy=False).generate([prompt], options)[0]
    assert spec.token_ids == plain.token_ids
    assert 0 < calls["mtp"] < spec.stats.steps  # some steps drafted by lookup, some by the head
