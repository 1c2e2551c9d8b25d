"""The native model and its KV cache: chunking, rollback, sliding windows, capacity errors."""
from __future__ import annotations

import pytest
import torch

from mtpspec.kv_cache import CacheFullError

from conftest import tiny_model


def run_chunks(model, ids, chunks, cache=None):
    """Feed ``ids`` [1, T] in the given chunk sizes; return logits for every position [T, V]."""
    cache = cache or model.new_cache(1, 128)
    out, start = [], 0
    for size in chunks:
        block = ids[:, start:start + size]
        positions = torch.arange(start, start + size)[None]
        logits, _ = model(block, positions, cache, num_logits=None)
        out.append(logits[0])
        start += size
    return torch.cat(out)


def test_one_pass_token_by_token_and_random_chunks_agree(tiny):
    torch.manual_seed(0)
    length = 50  # crosses the sliding window (8) many times
    ids = torch.randint(0, tiny.config.vocab_size, (1, length))
    whole = run_chunks(tiny, ids, [length])
    single = run_chunks(tiny, ids, [1] * length)
    assert torch.allclose(whole, single, atol=1e-4, rtol=1e-4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        sizes, left = [], length
        while left:
            size = int(torch.randint(1, 12, (1,), generator=gen))
            sizes.append(min(size, left))
            left -= sizes[-1]
        chunked = run_chunks(tiny, ids, sizes)
        assert torch.allclose(whole, chunked, atol=1e-4, rtol=1e-4)


def test_rollback_then_refeed_gives_same_logits(tiny):
    torch.manual_seed(1)
    ids = torch.randint(0, tiny.config.vocab_size, (1, 30))
    reference = run_chunks(tiny, ids, [30])
    cache = tiny.new_cache(1, 64)
    run_chunks(tiny, ids[:, :20], [20], cache)
    junk = torch.randint(0, tiny.config.vocab_size, (1, 9))
    tiny(junk, torch.arange(20, 29)[None], cache, num_logits=None)  # rejected drafts
    # rollback is moving the position back to 20; the junk slots get overwritten
    logits, _ = tiny(ids[:, 20:], torch.arange(20, 30)[None], cache, num_logits=None)
    assert torch.allclose(logits[0], reference[20:], atol=1e-4, rtol=1e-4)


def test_batched_ragged_positions_match_single_sequences(tiny):
    torch.manual_seed(2)
    seqs = [torch.randint(0, tiny.config.vocab_size, (n,)) for n in (13, 21, 5)]
    singles = [run_chunks(tiny, s[None], [len(s)]) for s in seqs]
    cache = tiny.new_cache(3, 64)
    longest = max(len(s) for s in seqs)
    ids = torch.zeros(3, longest, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s) - 1] = s[:-1]
    tiny(ids[:, :longest - 1], torch.arange(longest - 1).expand(3, -1), cache, num_logits=0)
    # now feed each row's last token at its own (ragged) position in one batched pass
    last = torch.tensor([[int(s[-1])] for s in seqs])
    positions = torch.tensor([[len(s) - 1] for s in seqs])
    logits, _ = tiny(last, positions, cache)
    for b in range(3):
        assert torch.allclose(logits[b, -1], singles[b][-1], atol=1e-4, rtol=1e-4)


def test_cache_capacity_error_is_clear(tiny):
    cache = tiny.new_cache(1, 16)
    ids = torch.zeros(1, 17, dtype=torch.long)
    with pytest.raises(CacheFullError, match="cache holds 16"):
        tiny(ids, torch.arange(17)[None], cache)


def test_all_weight_formats_run_and_stay_close():
    reference = tiny_model(seed=3, fmt="fp32")
    ids = torch.randint(0, reference.config.vocab_size, (1, 12))
    base = run_chunks(reference, ids, [12])
    # random tiny weights have small logit margins, so argmax agreement is a loose measure; the
    # relative logit error is the tight one (chance agreement would be 1/512)
    bounds = {"bf16": (0.9, 0.02), "int8": (0.75, 0.05), "int4": (0.25, 0.5)}
    for fmt, (min_agree, max_error) in bounds.items():
        model = tiny_model(seed=3, fmt=fmt)
        logits = run_chunks(model, ids, [12])
        assert torch.isfinite(logits).all()
        agree = (logits.argmax(-1) == base.argmax(-1)).float().mean()
        error = (logits - base).norm() / base.norm()
        assert agree >= min_agree and error <= max_error, (fmt, float(agree), float(error))
