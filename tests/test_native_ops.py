"""Every native op against its Python reference (in the spirit of ggml's test-backend-ops).

Ops: the packed product (per format, shape, row count 1..13 and thread count), packed row
reads, RMSNorm, attention (GQA, causal and sliding ranges, soft-cap), the argmax screen; the
stacks over the layer body are checked in test_fused.py and test_families.py. A failed build on
a CPU that can run the kernels FAILS here (no silent skip); only the portable path skips.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mtpspec import native, ops
from mtpspec.models.attention import attend, rms_norm
from mtpspec.ops import FORMATS, PackedLinear

needs_native = pytest.mark.skipif(native.portable_reason() is not None,
                                  reason=f"portable path: {native.portable_reason()}")


@needs_native
def test_the_native_build_succeeds():
    ext = native.require()  # raises the compiler's error when the build failed
    assert hasattr(ext, "TargetStack") and hasattr(ext, "screen_argmax")


def _reference_rows(layer: PackedLinear, monkeypatch) -> torch.Tensor:
    """The weight through the torch path of ``PackedLinear.rows`` (no native code)."""
    with monkeypatch.context() as m:
        m.setattr(ops, "_extension", lambda: None)
        return layer.dequantized()


@needs_native
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", [(17, 64), (96, 576), (40, 896), (33, 1024)])
def test_packed_product_and_rows(fmt, n, k, threads, monkeypatch):
    gen = torch.Generator().manual_seed(n + k)
    layer = PackedLinear.from_weight(torch.randn(n, k, generator=gen), fmt, group_size=32)
    w = _reference_rows(layer, monkeypatch)  # [N, K]
    assert torch.equal(layer.dequantized(), w)  # native row reads: the same bits
    x = torch.randn(13, k, generator=gen)
    full = layer(x)
    want = x.double() @ w.double().T
    assert (full - want).abs().max() <= 1e-5 * (x.abs().double() @ w.abs().double().T).max()
    for rows in range(1, 14):  # every row count: each row's bits never depend on the others
        assert torch.equal(layer(x[:rows]), full[:rows])


@needs_native
@pytest.mark.parametrize("n", [1, 7, 64])
def test_rms_norm(n):
    gen = torch.Generator().manual_seed(n)
    x, scale = torch.randn(5, n * 8 + 3, generator=gen), torch.randn(n * 8 + 3, generator=gen)
    got = native.require().rms_norm(x, scale, 1e-6)
    assert torch.allclose(got, rms_norm(x, scale, 1e-6), rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 256), (9, 3, 64), (14, 2, 128),
                                                     (8, 8, 16)])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_attention(heads, kv_heads, head_dim, softcap, threads):
    gen = torch.Generator().manual_seed(heads * head_dim)
    batch, slots, rows = 2, 700, 7
    k = torch.randn(batch, kv_heads, slots, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, slots, head_dim, generator=gen)
    q = torch.randn(rows, heads, head_dim, generator=gen)
    rowb = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    hi = torch.tensor([1, 300, 700, 5, 257, 513, 600])
    lo = torch.tensor([0, 0, 200, 0, 0, 400, 599])  # causal and sliding ranges
    scale = head_dim ** -0.5
    got = native.require().attention(q, k, v, rowb, lo, hi, scale, softcap, threads)
    for r in range(rows):
        mask = torch.zeros(1, 1, 1, slots, dtype=torch.bool)
        mask[..., lo[r]:hi[r]] = True
        want = attend(q[r][None, None], k[rowb[r]][None], v[rowb[r]][None], mask, scale, softcap)
        assert torch.allclose(got[r], want[0, 0], rtol=1e-5, atol=1e-5), r


@needs_native
@pytest.mark.parametrize("vocab,k", [(49_152, 576), (2_000, 896), (1_500, 1024)])
def test_screen_at_other_vocabularies_and_widths(vocab, k, threads):
    from mtpspec.screen import ArgmaxScreen

    gen = torch.Generator().manual_seed(vocab)
    head = PackedLinear.from_weight(torch.randn(vocab, k, generator=gen), "int8")
    hidden = torch.randn(9, k, generator=gen)
    assert torch.equal(ArgmaxScreen(head)(hidden), head(hidden).argmax(-1))


@needs_native
def test_calls_from_several_python_threads_give_the_serial_results(threads):
    """The native calls run without the GIL: Python threads may enter them at once (they then
    share the kernel pool one job at a time) and each gets its own, unchanged, numbers."""
    from concurrent.futures import ThreadPoolExecutor

    from mtpspec.screen import ArgmaxScreen

    gen = torch.Generator().manual_seed(5)
    layer = PackedLinear.from_weight(torch.randn(3000, 320, generator=gen), "int8")
    screen = ArgmaxScreen(layer)
    xs = [torch.randn(r, 320, generator=gen) for r in (1, 3, 5, 8)]
    serial = [(layer(x), screen(x)) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            results = list(pool.map(lambda x: (layer(x), screen(x)), xs))
            for (y, t), (y0, t0) in zip(results, serial):
                assert torch.equal(y, y0) and torch.equal(t, t0)


PORTABLE_SCRIPT = """
import json, torch
from mtpspec import native
from mtpspec.config import tiny_config
from mtpspec.engine import Engine, GenerateOptions
from mtpspec.models.decoder import DecoderModel, random_weights
torch.set_num_threads(1)
config = tiny_config()
model = DecoderModel(config, random_weights(config, seed=3), "int8")
out = Engine(model).generate([[2, 17, 99, 5], [2, 8]], GenerateOptions(max_new_tokens=12,
                             ignore_eos=True))
print(json.dumps({"native": native.extension() is not None,
                  "tokens": [o.token_ids for o in out]}))
"""


def _greedy_tokens(portable: bool) -> dict:
    import json
    import os

    env = {**os.environ, native.PORTABLE_ENV: "1" if portable else "0"}
    done = subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_the_portable_path_gives_the_same_greedy_tokens():
    """MTPSPEC_PORTABLE=1 (what a CPU without AVX2/FMA/F16C gets): no native code, one warning,
    and the same greedy tokens as the native path."""
    portable, warnings_text = _greedy_tokens(True)
    assert not portable["native"]
    assert warnings_text.count("native kernels unavailable") == 1
    fast, _ = _greedy_tokens(False)
    assert fast["native"] == (native.portable_reason() is None)
    assert portable["tokens"] == fast["tokens"]
    assert all(len(t) == 12 for t in fast["tokens"])


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's lock behind, and every later import would wait on it
    forever; an old lock is removed, a recent one (a build running now) is left alone."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = tmp_path / "fake_ext" / "lock"
    assert os.path.realpath(_get_build_directory("fake_ext", verbose=False)) == str(lock.parent)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    assert not native.clear_stale_lock("fake_ext") and lock.exists()
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale native build lock"):
        assert native.clear_stale_lock("fake_ext")
    assert not lock.exists()


def test_checkouts_at_other_paths_build_apart(monkeypatch, tmp_path):
    name = native.build_name()
    monkeypatch.setattr(native, "CSRC", tmp_path)
    (tmp_path / "x.cpp").write_text("int f() { return 1; }\n")
    assert native.build_name() != name and native.build_name().startswith("mtpspec_native_")
