"""The fused C++ path (mtpspec.fused) against the Python reference layers it replaces.

Every test runs the same calls twice, ``use_fused`` on and off, on fresh caches, and compares the
logits (relative to their scale), the K/V written to the cache, and the drafter's proposals.
"""
from __future__ import annotations

import pytest
import torch

from mtpspec import fused, native, ops
from mtpspec.drafter.head import DrafterConfig, MTPHead, init_weights
from mtpspec.ops import FORMATS, PackedLinear
from mtpspec.proposers.base import DraftState
from mtpspec.proposers.mtp import DraftHeadLogits, MTPProposer
from mtpspec.sampling import SamplingParams

from conftest import tiny_model

# skipped only where the native kernels may not run; a failed build fails test_native_ops
pytestmark = pytest.mark.skipif(native.portable_reason() is not None,
                                reason=f"portable path: {native.portable_reason()}")

REL_TOL = 2e-5  # max |fused - reference| / max |reference|: summation order only


def run(model, calls, batch, use_fused, max_len=160):
    """Apply ``calls`` [(ids [B, T], positions [B, T], num_logits)] on a fresh cache; return the
    logits of each call and the cache."""
    model.use_fused = use_fused
    cache = model.new_cache(batch, max_len)
    try:
        outs = [model(ids, pos, cache, num_logits=n) for ids, pos, n in calls]
    finally:
        model.use_fused = True
    return outs, cache


def assert_close(got, want, tol=REL_TOL):
    scale = want.abs().max().item()
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= tol * scale, (got - want).abs().max().item() / scale


def compare(model, calls, batch, max_len=160):
    fast, fast_cache = run(model, calls, batch, True, max_len)
    ref, ref_cache = run(model, calls, batch, False, max_len)
    for (fl, fh), (rl, rh) in zip(fast, ref):
        assert_close(fh, rh)
        if rl is not None:
            assert_close(fl, rl)
    assert_close(fast_cache.k, ref_cache.k)
    assert_close(fast_cache.v, ref_cache.v)
    return fast, ref


def chunks(ids, sizes, num_logits=None):
    """Consecutive blocks of ``ids`` [B, T] at their positions."""
    calls, start = [], 0
    for size in sizes:
        pos = torch.arange(start, start + size).expand(ids.shape[0], -1)
        calls.append((ids[:, start:start + size], pos, num_logits))
        start += size
    return calls


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill_chunks_decode_and_verification_match(fmt, threads):
    model = tiny_model(seed=4, fmt=fmt)  # window 8: every call below crosses it
    ids = torch.randint(0, model.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(0))
    # prefill in uneven chunks, one-token decode steps, then k+1-token verification blocks
    compare(model, chunks(ids, [17, 9, 1, 1, 1, 5, 8, 1, 9, 8]), batch=2)


@pytest.mark.parametrize("kv_heads,heads", [(1, 4), (2, 4), (4, 4)])
def test_head_layouts_and_long_attention_blocks(kv_heads, heads, threads):
    # 300 positions: global layers attend over several 128-slot blocks merged by rescaling
    model = tiny_model(seed=5, num_kv_heads=kv_heads, num_heads=heads, sliding_window=200)
    ids = torch.randint(0, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1))
    compare(model, chunks(ids, [150, 140, 1, 9], num_logits=1), batch=1, max_len=320)


def test_ragged_right_padded_batch(threads):
    model = tiny_model(seed=6, fmt="int8")
    gen = torch.Generator().manual_seed(2)
    lengths = [13, 21, 5]
    ids = torch.randint(0, model.config.vocab_size, (3, 30), generator=gen)
    prefill = (ids[:, :21], torch.arange(21).expand(3, -1), 0)
    # each row continues at its own position (pad slots past a row's length are overwritten)
    step1 = (ids[:, 21:22], torch.tensor(lengths)[:, None], None)
    verify = (ids[:, 22:27], torch.tensor(lengths)[:, None] + 1 + torch.arange(5), None)
    fast, _ = compare(model, [prefill, step1, verify], batch=3)
    # and each row equals the same sequence run alone
    for b, n in enumerate(lengths):
        seq = torch.cat([ids[b, :n], ids[b, 21:27]])[None]
        alone, _ = run(model, chunks(seq, [n, 1, 5]), 1, True)
        assert_close(fast[1][0][b], alone[1][0][0], 1e-5)
        assert_close(fast[2][0][b], alone[2][0][0], 1e-5)


def test_autograd_and_dense_keep_the_python_path():
    model = tiny_model(seed=7)
    cache = model.new_cache(1, 16)
    ids, pos = torch.tensor([[1, 2, 3]]), torch.arange(3)[None]
    with torch.enable_grad():
        assert model._fused_stack(ids, cache) is None
    with torch.no_grad():
        assert model._fused_stack(ids, cache) is not None
    dense = tiny_model(seed=7, fmt="dense")
    with torch.no_grad():
        assert dense._fused_stack(ids, dense.new_cache(1, 16)) is None
    logits, _ = dense(ids, pos, dense.new_cache(1, 16))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_and_cluster_ordered_copy_are_bit_exact(fmt):
    w = torch.randn(200, 40, generator=torch.Generator().manual_seed(3))
    layer = PackedLinear.from_weight(w, fmt, group_size=16)
    idx = torch.tensor([0, 17, 199, 31, 16, 15, 100])
    assert torch.equal(layer.rows(idx), layer.dequantized()[idx])
    clusters = torch.randperm(200, generator=torch.Generator().manual_seed(4))[:120].view(12, 10)
    ordered = fused.cluster_ordered(layer, clusters, chunk=64)
    assert ordered.out_features == 12 * 16 and ordered.fmt == fmt
    rows = ordered.dequantized().view(12, 16, 40)
    assert torch.equal(rows[:, :10], layer.rows(clusters.flatten()).view(12, 10, 40))
    assert not rows[:, 10:].any()


# ---- the drafter


def tiny_drafter(target, num_clusters=16, num_layers=2, seed=0):
    cfg = DrafterConfig.for_target(target.config, num_layers=num_layers, d_draft=48,
                                   intermediate_size=96, num_heads=4, head="clustered",
                                   num_clusters=num_clusters, top_clusters=3, frequency_vocab=64)
    head = MTPHead(cfg)
    init_weights(head, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    rows = target.embed.dequantized()
    ordering = torch.randperm(cfg.vocab_size, generator=gen)
    centroids = rows[ordering].view(num_clusters, -1, rows.shape[1]).mean(1)
    head.init_from_kmeans(ordering, centroids)
    return head.eval()


def drafter_state(target, lengths, seed=0, greedy=True):
    """A target cache prefilled with right-padded prompts, and the engine's view of it."""
    gen = torch.Generator().manual_seed(seed)
    batch, longest = len(lengths), max(lengths)
    ids = torch.randint(2, target.config.vocab_size, (batch, longest), generator=gen)
    cache = target.new_cache(batch, longest + 16)
    _, hidden = target(ids, torch.arange(longest).expand(batch, -1), cache, num_logits=0)
    last = torch.stack([hidden[b, n - 1] for b, n in enumerate(lengths)])
    tokens = [ids[b, :n].tolist() for b, n in enumerate(lengths)]
    params = SamplingParams() if greedy else SamplingParams(temperature=0.8, top_p=0.95)
    return DraftState(tokens=tokens, hidden=last, positions=torch.tensor(lengths), cache=cache,
                      params=params, generator=None if greedy else torch.Generator().manual_seed(9))


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("num_clusters", [16, 64])  # clusters of 32 tokens, and of 8 (padded)
def test_draft_step_and_clustered_head_match(fmt, num_clusters, threads):
    target = tiny_model(seed=8, fmt=fmt, sliding_window=6)
    head = tiny_drafter(target, num_clusters)
    fast = fused.FusedDrafter(head, target, "clustered", share_screen=False)
    state = drafter_state(target, [9, 3, 14])
    token = torch.tensor([5, 6, 7])
    for query in (state.positions, state.positions + 2):  # constant and advancing positions
        got = fast.step(token, state.hidden, query, state.positions, state.cache)
        kv = [(state.cache.k[layer, :3], state.cache.v[layer, :3]) for layer in head.cfg.target_layers]
        embeds = target.embed_tokens(token)[:, None]
        with torch.no_grad():
            want = head.step(embeds, state.hidden[:, None], query[:, None],
                             state.positions[:, None], kv)[:, 0]
        assert_close(got, want)
    logits_ref, ids_ref = DraftHeadLogits(head, target)(want)
    best, logits, ids = fast.clustered(want, want_logits=True)
    assert torch.equal(ids, ids_ref)
    assert_close(logits, logits_ref)
    assert torch.equal(best, ids_ref.gather(1, logits_ref.argmax(-1, keepdim=True))[:, 0])


def test_clustered_head_on_the_shared_screen_stays_within_its_bound(threads):
    """With an int8 target the clustered head reads the argmax screen's copy of the embedding:
    its logits are integer estimates, each within the screen's bound of the exact logit."""
    target = tiny_model(seed=8, fmt="int8")
    head = tiny_drafter(target, 16)
    fast = fused.FusedDrafter(head, target, "clustered")
    assert fast.shares_screen and target.enable_argmax_screen() is not None
    own = fused.FusedDrafter(head, target, "clustered", share_screen=False)
    assert not own.shares_screen
    assert own.nbytes - fast.nbytes >= target.embed.nbytes * 0.9  # no cluster-ordered copy
    h = drafter_state(target, [9, 3, 14]).hidden
    logits_ref, ids_ref = DraftHeadLogits(head, target)(h)
    best, logits, ids = fast.clustered(h, want_logits=True)
    assert torch.equal(ids, ids_ref)
    screen = target.enable_argmax_screen()
    inverse = {int(t): i for i, t in enumerate(screen.order)}
    beta = screen.beta[[inverse[int(t)] for t in ids.flatten()]].view(ids.shape)
    groups = torch.nn.functional.pad(h, (0, -h.shape[1] % 32)).view(h.shape[0], -1, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 63  # the screen's 6-bit activations
    err = (groups - torch.round(groups / scale) * scale).flatten(1).norm(dim=-1, keepdim=True)
    radius = err * 1.001 + 1e-4 * h.norm(dim=-1, keepdim=True)  # [B, 1] (mtpspec.screen)
    assert ((logits - logits_ref).abs() <= beta * radius * 1.01 + 1e-6).all()
    assert torch.equal(best, ids.gather(1, logits.argmax(-1, keepdim=True))[:, 0])


def test_draft_step_sees_nothing_at_position_zero():
    target = tiny_model(seed=9)
    head = tiny_drafter(target)
    fast = fused.FusedDrafter(head, target, "clustered")
    state = drafter_state(target, [4])
    zero = torch.tensor([0])
    got = fast.step(torch.tensor([3]), state.hidden, zero, zero, state.cache)
    kv = [(state.cache.k[layer, :1], state.cache.v[layer, :1]) for layer in head.cfg.target_layers]
    with torch.no_grad():
        want = head.step(target.embed_tokens(torch.tensor([3]))[:, None], state.hidden[:, None],
                         zero[:, None], zero[:, None], kv)[:, 0]
    assert_close(got, want)


@pytest.mark.parametrize("kind", ["clustered", "full", "frequency"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampling"])
def test_proposals_equal_reference(kind, greedy, threads):
    target = tiny_model(seed=10, fmt="int8")
    head = tiny_drafter(target, num_clusters=32, seed=1)
    drafts = []
    for use_fused in (True, False):
        proposer = MTPProposer(head, target, kind, use_fused=use_fused, fused_weights="fp32",
                               share_screen=False)
        assert (proposer.fused is not None) == use_fused
        drafts.append(proposer.propose(drafter_state(target, [11, 4, 17], greedy=greedy), k=5))
    fast, ref = drafts
    assert torch.equal(fast.tokens, ref.tokens)
    if not greedy:
        assert (fast.probs - ref.probs).abs().max() < 1e-5


# ---- the real default model


@pytest.fixture(scope="module")
def real_int8():
    from mtpspec.runtime import load_target

    try:
        return load_target(None, "int8", with_tokenizer=False).model
    except Exception as err:  # noqa: BLE001 - any failure to load means: skip
        pytest.skip(f"default model unavailable: {err}")


@pytest.mark.real
def test_real_model_greedy_argmax_identical(real_int8):
    model = real_int8
    gen = torch.Generator().manual_seed(0)
    # a repetitive token stream the model can predict, so the argmax is mostly not a near-tie
    ids = torch.randint(2, 20_000, (1, 64), generator=gen).repeat(1, 5)  # [1, 320]
    sizes = [128, 64, 1, 1, 1, 5, 8, 1, 64, 47]  # prefill, decode, verification blocks
    fast, ref = compare(model, chunks(ids, sizes), batch=1, max_len=400)
    fast_logits = torch.cat([logits[0] for logits, _ in fast])  # [320, V]
    ref_logits = torch.cat([logits[0] for logits, _ in ref])
    same = fast_logits.argmax(-1) == ref_logits.argmax(-1)
    # a flip is only allowed at an exact near-tie: top-2 margin within twice the largest difference
    top2 = ref_logits.topk(2, dim=-1).values
    tie = (top2[:, 0] - top2[:, 1]) <= 2 * (fast_logits - ref_logits).abs().max()
    assert (same | tie).all() and same.float().mean() >= 0.99, int((~same).sum())


@pytest.mark.real
def test_real_drafter_proposals_equal_reference(real_int8):
    from mtpspec.drafter import load_drafter, shipped_drafter_for
    from mtpspec.loading import load_weights

    loaded = load_weights(None, with_tensors=False)
    folder = shipped_drafter_for(loaded.weights_hash)
    if folder is None:
        pytest.skip("no shipped drafter for the default model")
    head = load_drafter(folder, real_int8.config, loaded.weights_hash)
    state = drafter_state(real_int8, [40, 25])
    fast = MTPProposer(head, real_int8, fused_weights="fp32").propose(state, k=4)
    ref = MTPProposer(head, real_int8, use_fused=False).propose(state, k=4)
    assert torch.equal(fast.tokens, ref.tokens)


def test_python_path_when_the_extension_lacks_the_fused_layers(monkeypatch):
    monkeypatch.setattr(ops, "fused_extension", lambda: None)
    model = tiny_model(seed=11)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    logits, _ = model(ids, torch.arange(12)[None], model.new_cache(1, 16), num_logits=None)
    assert model._fused is False and torch.isfinite(logits).all()
    assert MTPProposer(tiny_drafter(model), model).fused is None


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_compact_draft_weights_stay_close(weights):
    target = tiny_model(seed=12, fmt="int8")
    head = tiny_drafter(target)
    state = drafter_state(target, [9, 5])
    args = (torch.tensor([3, 4]), state.hidden, state.positions, state.positions, state.cache)
    exact = fused.FusedDrafter(head, target, "clustered").step(*args)
    rounded = fused.FusedDrafter(head, target, "clustered", weights=weights).step(*args)
    assert_close(rounded, exact, tol=3e-2)


def test_draft_step_with_rope_tables_of_different_lengths():
    target = tiny_model(seed=13)
    head = tiny_drafter(target)
    head.rope_tables(5000, True, torch.device("cpu"))  # the global table grew alone
    state = drafter_state(target, [7])
    fast = fused.FusedDrafter(head, target, "clustered")
    assert torch.isfinite(fast.step(torch.tensor([2]), state.hidden, state.positions,
                                    state.positions, state.cache)).all()


def test_memory_accounting_counts_the_fused_copies():
    """The fused draft step packs the head and a cluster-ordered copy of the target's embedding:
    the proposer's memory includes them, on top of the head's own float weights."""
    from mtpspec.proposers.factory import module_nbytes, proposer_nbytes

    target = tiny_model(seed=14, fmt="int8")
    head = tiny_drafter(target)
    python = MTPProposer(head, target, use_fused=False)
    fast = MTPProposer(head, target)
    assert proposer_nbytes(python, target) == module_nbytes(head)
    copy = target.embed.nbytes  # the same rows (plus padding), in the target's format
    assert proposer_nbytes(fast, target) >= module_nbytes(head) + copy
    assert fast.fused.nbytes >= copy


# ---- batch invariance: every token's numbers are the same however the call is shaped


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tokens_logits_do_not_depend_on_the_call_shape(fmt):
    """Greedy speculative decoding reproduces plain decoding bit for bit only if a token's logits
    are identical whether it is decoded alone, verified inside a block of k+1 tokens, or decoded
    beside other sequences: compare all three exactly (contexts cross several attention parts)."""
    target = tiny_model(seed=15, fmt=fmt, max_position_embeddings=2048)
    with torch.inference_mode():  # the fused path runs
        assert target._fused_stack(torch.zeros(1, 1, dtype=torch.long), target.new_cache(1, 8))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, target.config.vocab_size, (2, 700), generator=gen)

    def run(batch_rows, blocks):
        """logits [rows, T, V] of sequences fed in ``blocks`` of tokens after a 300-token prefill."""
        cache = target.new_cache(len(batch_rows), 720)
        out, start = [], 0
        for size in [300] + blocks:
            chunk = ids[batch_rows, start:start + size]
            pos = torch.arange(start, start + size).expand(len(batch_rows), -1)
            logits, _ = target(chunk, pos, cache, num_logits=None)
            out.append(logits)
            start += size
        return torch.cat(out, dim=1)

    one_by_one = run([0], [1] * 33)  # plain decoding
    blocks = run([0], [5, 1, 8, 3, 9, 7])  # verification blocks of k+1 tokens
    assert torch.equal(one_by_one, blocks)
    batched = run([0, 1], [1] * 6 + [4, 8, 2, 3, 4, 6])  # beside another sequence
    assert torch.equal(one_by_one[0], batched[0])
