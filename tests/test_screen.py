"""The argmax screen (mtpspec.screen) returns exactly the int8 head's argmax: the token
``PackedLinear(hidden).argmax(-1)`` picks, first index on ties, while computing few exact logits."""
import pytest
import torch

from mtpspec import native
from mtpspec.ops import PackedLinear, set_num_threads
from mtpspec.screen import ArgmaxScreen, check_ordering

# skipped only where the native kernels may not run; a failed build fails test_native_ops
pytestmark = pytest.mark.skipif(native.portable_reason() is not None,
                                reason=f"portable path: {native.portable_reason()}")


def _head(vocab: int, k: int, seed: int = 0) -> PackedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, k, generator=g) * (0.5 + torch.rand(vocab, 1, generator=g))
    return PackedLinear.from_weight(w, "int8")


def _hidden(rows: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, k, generator=g)
    h[:, :3] *= 12.0  # a few large channels, as final hidden states have
    return h


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    set_num_threads(request.param)
    yield request.param
    set_num_threads(2)


@pytest.mark.parametrize("vocab,k", [(4096, 640), (1000, 100), (37, 33)])
def test_screen_equals_full_argmax(vocab, k, threads):
    head = _head(vocab, k)
    screen = ArgmaxScreen(head)
    for rows in (1, 2, 3, 4, 5, 7, 8, 9, 16, 70):  # 70: more than one C++ call
        h = _hidden(rows, k, seed=rows)
        assert torch.equal(screen(h), head(h).argmax(-1)), (vocab, k, rows)


def test_screen_prunes_on_a_clear_winner():
    head = _head(8192, 256)
    screen = ArgmaxScreen(head)
    h = head.dequantized()[[5, 700, 8000]] * 3.0  # each row is its own token's direction
    assert screen(h).tolist() == head(h).argmax(-1).tolist() == [5, 700, 8000]
    assert int(screen.last_candidates.max()) < 100  # recomputed exactly: a handful, not 8192


def test_ties_go_to_the_first_token_like_torch_argmax():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(512, 64, generator=g)
    w[300] = w[40]  # identical rows: identical logits
    w[41] = w[40] * (1 - 1e-7)  # a near-tie that int8 rounds onto the same row
    head = PackedLinear.from_weight(w, "int8")
    screen = ArgmaxScreen(head)
    h = torch.stack([head.dequantized()[40], -head.dequantized()[40], torch.zeros(64)])
    assert torch.equal(screen(h), head(h).argmax(-1))
    assert int(screen(h)[0]) == 40 and int(screen(h)[2]) == 0  # all-zero logits: token 0


def test_near_ties_between_different_rows_are_exact():
    """Two rows whose logits differ in the last bits: the screen cannot tell them apart, the exact
    rescoring must."""
    head = _head(2048, 128, seed=5)
    base = head.dequantized()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randint(0, 2048, (2,), generator=g).tolist()
        h = (base[a] + base[b]) / 2 + 1e-6 * torch.randn(128, generator=g)
        assert torch.equal(ArgmaxScreen(head)(h[None]), head(h[None]).argmax(-1)), seed


def test_ordered_copy_with_padding():
    head = _head(1000, 96)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    order = torch.cat([order, torch.full((8,), -1)])  # padding rows never win
    screen = ArgmaxScreen(head, ordering=order)
    h = _hidden(6, 96)
    assert torch.equal(screen(h), head(h).argmax(-1))


def test_non_finite_rows_fall_back_to_the_full_product():
    head = _head(300, 64)
    h = _hidden(3, 64)
    h[1, 5] = float("nan")
    assert torch.equal(ArgmaxScreen(head)(h), head(h).argmax(-1))


def test_only_int8_heads():
    with pytest.raises(ValueError, match="int8"):
        ArgmaxScreen(PackedLinear.from_weight(torch.randn(32, 32), "bf16"))


def _near_tie_head(k: int, vocab: int, seed: int) -> tuple[PackedLinear, torch.Tensor]:
    """An int8 head whose rows are one positive base row with +-1 nudges, and hidden rows of many
    small same-sign values on the screen's own 6-bit grid (no activation rounding error: only the
    float32 rounding of both sums separates the screen's estimates from the exact logits), scaled
    so that logits are ~1.3 and the nudged tokens lie ~5e-5 apart."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(40, 120, (k,), generator=g)
    q = base.repeat(vocab, 1)  # [V, K]
    for t in range(1, vocab):  # each token moves one unit between two inputs
        i, j = torch.randint(0, k, (2,), generator=g)
        q[t, i] += 1
        q[t, j] -= 1
    q[:, 0] = 127  # every row's max: one int8 scale for all
    a = torch.randint(20, 64, (64, k), generator=g).float()  # [rows, K] grid values
    a[:, ::32] = 63  # each group's max sits on the grid
    s, sc = 1.0, 1.0
    dot = (a[0] * base.float()).sum()
    sc = 1.3 / float(dot)  # logits ~1.3; a unit nudge moves a logit by ~43 sc ~ 5e-5 / (K / 640)
    head = PackedLinear.from_weight(q.float() * s, "int8")
    return head, a * sc


@pytest.mark.parametrize("k", [640, 2560, 5376])
def test_adversarial_near_ties_at_every_hidden_size(k, threads):
    head, hidden = _near_tie_head(k, vocab=96, seed=k)
    logits = head(hidden)
    gap = (logits.topk(2).values[:, 0] - logits.topk(2).values[:, 1])
    assert float(logits.abs().max()) < 2.0 and float(gap.min()) < 1e-4  # real near-ties
    screen = ArgmaxScreen(head)
    assert torch.equal(screen(hidden), logits.argmax(-1))


def _rounding_adversary(k: int) -> tuple[PackedLinear, torch.Tensor]:
    """Token 0 = [127, 0, .., 0, 1, 1, ...] against x = [x0, 0, .., t, t, ...] with t just over half
    an ulp of the running sum: every one of its K - 32 float32 additions rounds up, so its exact
    (full-product) logit exceeds the real dot product by ~(K - 32) u |logit|, while the screen's
    integer estimate is nearly exact. Token 17 (another panel) = [127, 5, 0, ...] sits just below
    token 0's float32 logit. The old fixed slack 1e-4 ||h|| covered ~(K/640) * 4e-5 and so missed
    token 0 at K = 5,376 (the screen answered 17); the derived slack grows with K. Logits ~1.0,
    ~1.2e-5 apart (x scaled by 2^-7, which keeps every rounding)."""
    x0 = torch.tensor(128 / 127, dtype=torch.float32)
    x = torch.zeros(k)
    x[0], x[1] = x0, x0 / 63  # both on the screen's 6-bit grid of the first group
    x[32:] = 0.51 * 2.0 ** -16
    rows = torch.zeros(32, k)
    rows[0, 0], rows[0, 32:] = 127, 1
    rows[17, 0], rows[17, 1] = 127, 5
    return PackedLinear.from_weight(rows, "int8"), x[None] * 2.0 ** -7


@pytest.mark.parametrize("k", [640, 2560, 5376])
def test_float32_rounding_adversary(k, threads):
    head, hidden = _rounding_adversary(k)
    logits = head(hidden)[0]
    if k == 5376:  # the case the old slack got wrong: token 0 wins by float32 rounding alone
        assert int(logits.argmax()) == 0 and 0 < float(logits[0] - logits[17]) < 2e-5
    rows = hidden.expand(3, -1).contiguous()
    assert torch.equal(ArgmaxScreen(head)(rows), head(rows).argmax(-1))


def test_huge_activations_take_the_full_head():
    head = _head(300, 64)
    hidden = torch.zeros(2, 64)
    hidden[:, 0], hidden[:, 1] = 3e38, -3e38
    hidden[1, 2] = 1.0
    assert torch.equal(ArgmaxScreen(head)(hidden), head(hidden).argmax(-1))


def test_orderings_must_be_permutations():
    head = _head(64, 32)
    order = torch.arange(64)
    order[5] = 7  # 7 twice, 5 missing
    with pytest.raises(ValueError, match="permutation"):
        ArgmaxScreen(head, order)
    with pytest.raises(ValueError, match="outside"):
        check_ordering(torch.tensor([0, 1, 2, 64]), 64)
    check_ordering(torch.cat([torch.arange(64), torch.full((16,), -1)]), 64)  # padding is fine


def test_no_screen_under_a_final_logit_softcap():
    with pytest.raises(ValueError, match="soft-cap"):
        ArgmaxScreen(_head(64, 32), final_logit_softcap=30.0)
