"""Correctness of mtpspec.ops.PackedLinear: kernel vs its own dequantized weight, and the
dequantized weight vs the original within each format's quantization error."""
import pytest
import torch

from mtpspec import native
from mtpspec.ops import FORMATS, PackedLinear, kernels_available, set_num_threads

# max |W - dequantized(W)| relative to the largest |W| in the row (or group, for int4)
QUANT_TOL = {"fp32": 0.0, "bf16": 2.0**-8, "int8": 0.5 / 127 + 1e-6, "int4": 0.5 / 15 + 2e-3}


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)  # rows of varied scale


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    set_num_threads(request.param)
    yield request.param
    set_num_threads(1)


def test_kernels_build():
    if native.portable_reason() is not None:
        pytest.skip(f"portable path: {native.portable_reason()}")
    assert kernels_available(), "AVX2 kernels did not build; the F.linear fallback is in use"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", [(64, 96), (37, 45), (100, 64), (1536, 640), (17, 1)])
def test_forward_matches_dequantized(fmt, n, k, threads):
    layer = PackedLinear.from_weight(_weight(n, k), fmt)
    w = layer.dequantized().double()  # [n, k]
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 33):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        y = layer(x)
        ref = x.double() @ w.T
        assert y.dtype == torch.float32 and y.shape == (m, n)
        scale = ref.abs().max().item() + 1e-30
        assert (y.double() - ref).abs().max().item() / scale < 2e-6, (fmt, n, k, m)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantized_close_to_weight(fmt):
    w = _weight(48, 160, seed=1)
    wq = PackedLinear.from_weight(w, fmt, group_size=32).dequantized()
    assert wq.shape == w.shape and wq.dtype == torch.float32
    if fmt == "int4":  # relative to each group's range
        err = (wq - w).abs().reshape(48, 5, 32).amax(2)
        rng = w.reshape(48, 5, 32)
        rng = rng.amax(2) - rng.amin(2)
        assert (err <= QUANT_TOL[fmt] * rng + 1e-6).all()
    else:
        err = (wq - w).abs().amax(1)
        assert (err <= QUANT_TOL[fmt] * w.abs().amax(1) + 1e-12).all()
    if fmt == "fp32":
        assert torch.equal(wq, w)
    if fmt == "bf16":
        assert torch.equal(wq, w.to(torch.bfloat16).float())


def test_int4_ragged_last_group_and_group_size():
    w = _weight(20, 70, seed=2)  # 70 = 2 groups of 32 + a group of 6
    for g in (32, 64, 128):
        wq = PackedLinear.from_weight(w, "int4", group_size=g).dequantized()
        assert (wq - w).abs().max() <= (w.max() - w.min()) / 15


def test_int4_exact_on_affine_grid():
    # a Q4_K-like weight: per group of 32, w = q * s + b with q in 0..15 spanning the full range
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (32, 128), generator=g).float()
    q[:, ::32] = 0
    q[:, 1::32] = 15
    s = (torch.rand(32, 4, generator=g) * 0.1 + 0.01).half().float().repeat_interleave(32, 1)
    b = (-torch.rand(32, 4, generator=g)).half().float().repeat_interleave(32, 1)
    w = q * s + b
    wq = PackedLinear.from_weight(w, "int4").dequantized()
    assert (wq - w).abs().max() < 1e-3 * w.abs().max()


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_consistent(fmt):
    layer = PackedLinear.from_weight(_weight(77, 64, seed=4), fmt)
    full = layer.dequantized()
    idx = torch.tensor([0, 76, 15, 16, 8, 7, 40, 40])
    assert torch.equal(layer.rows(idx), full[idx])


@pytest.mark.parametrize("fmt", FORMATS)
def test_3d_input_and_noncontiguous(fmt):
    layer = PackedLinear.from_weight(_weight(40, 32, seed=5), fmt)
    x = torch.randn(2, 3, 64)[..., ::2]  # [2, 3, 32], non-contiguous
    y = layer(x)
    assert y.shape == (2, 3, 40)
    ref = x.reshape(6, 32) @ layer.dequantized().T
    torch.testing.assert_close(y.reshape(6, 40), ref, rtol=1e-5, atol=1e-5)


def test_nbytes_and_attributes():
    w = _weight(64, 64)
    sizes = {f: PackedLinear.from_weight(w, f).nbytes for f in FORMATS}
    assert sizes == {"fp32": 64 * 64 * 4, "bf16": 64 * 64 * 2, "int8": 64 * 64 + 64 * 4,
                     "int4": 64 * 64 // 2 + 64 * 2 * 2 * 2}
    layer = PackedLinear.from_weight(w, "int8")
    assert (layer.out_features, layer.in_features, layer.fmt) == (64, 64, "int8")


def test_zero_rows_and_bad_format():
    layer = PackedLinear.from_weight(torch.zeros(16, 8), "int8")
    assert torch.equal(layer(torch.ones(1, 8)), torch.zeros(1, 16))
    assert layer(torch.ones(0, 8)).shape == (0, 16)
    with pytest.raises(ValueError):
        PackedLinear.from_weight(torch.zeros(4, 4), "fp8")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("in_features", [64, 96, 200])
def test_each_rows_result_is_independent_of_the_row_count(fmt, in_features):
    """Bit-identical rows whether computed alone or among 2..13 rows (every micro-kernel shape,
    panel remainders): what makes verification and batching reproduce plain decoding exactly."""
    gen = torch.Generator().manual_seed(3)
    linear = PackedLinear.from_weight(torch.randn(16 * 9 + 5, in_features, generator=gen), fmt)
    x = torch.randn(13, in_features, generator=gen)
    alone = torch.cat([linear(x[i:i + 1]) for i in range(len(x))])
    for rows in range(2, len(x) + 1):
        assert torch.equal(linear(x[:rows]), alone[:rows]), rows
