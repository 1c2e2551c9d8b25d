"""The one native decoder-layer body across model families, against the Python reference.

Each family is a tiny random ``ModelConfig`` (``tiny_config`` overrides): Gemma 3 (the default),
Llama (no norm offset, no sandwich norms, no q/k norm, SwiGLU, unscaled embedding, untied head),
Qwen2 (+ QKV bias), Qwen3 (+ q/k norm), Gemma 2 (attention and final logit soft-caps), and
SmolLM2's non-power-of-two shapes (hidden 576, 9 heads, 3 kv heads, head_dim 64). The fused stack
must give the reference's logits and caches (fp32: summation order only) and keep every token's
logits bit-identical whatever the call shape (what greedy speculative decoding relies on). The
MTP draft step must honour its head settings (norm offset, out norm, layer scalars, partial
rotary) or refuse the head.
"""
from __future__ import annotations

import pytest
import torch

from mtpspec import fused, native
from mtpspec.drafter.head import DrafterConfig, MTPHead

from conftest import tiny_model
from test_fused import assert_close, chunks, compare, drafter_state, tiny_drafter

pytestmark = pytest.mark.skipif(native.portable_reason() is not None,
                                reason="the portable path has no fused stack")

LLAMA = dict(family="llama", norm_offset=0.0, sandwich_norms=False, qk_norm=False,
             mlp_activation="silu", scale_embeddings=False, tie_word_embeddings=False,
             sliding_window_pattern=1)
FAMILIES = {
    "gemma3": {},
    "llama": LLAMA,
    "mistral_window": {**LLAMA, "family": "mistral", "sliding_window_pattern": 2},
    "qwen2": {**LLAMA, "family": "qwen2", "qkv_bias": True},
    "qwen3": {**LLAMA, "family": "qwen3", "qk_norm": True},
    "gemma2": dict(family="gemma2", qk_norm=False, attn_logit_softcap=2.0,
                   final_logit_softcap=3.0),
    "smollm2": {**LLAMA, "hidden_size": 576, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64,
                "query_pre_attn_scalar": 64.0, "intermediate_size": 160, "num_layers": 2},
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_fused_stack_matches_the_reference(family, fmt):
    model = tiny_model(seed=21, fmt=fmt, **FAMILIES[family])
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert model._fused_stack(ids, model.new_cache(1, 8)) is not None  # the fused path runs
    compare(model, chunks(ids, [11, 1, 5, 3]), batch=2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "smollm2"])
def test_a_tokens_logits_do_not_depend_on_the_call_shape(family):
    target = tiny_model(seed=22, fmt="int8", max_position_embeddings=1024, **FAMILIES[family])
    ids = torch.randint(3, target.config.vocab_size, (2, 340), generator=torch.Generator().manual_seed(1))

    def run(rows, blocks):
        cache = target.new_cache(len(rows), 360)
        out, start = [], 0
        for size in [300] + blocks:
            pos = torch.arange(start, start + size).expand(len(rows), -1)
            out.append(target(ids[rows, start:start + size], pos, cache, num_logits=None)[0])
            start += size
        return torch.cat(out, dim=1)

    one_by_one = run([0], [1] * 12)
    assert torch.equal(one_by_one, run([0], [5, 1, 4, 2]))
    assert torch.equal(one_by_one[0], run([0, 1], [1] * 4 + [3, 5])[0])


def test_the_stack_names_a_wrong_field():
    model = tiny_model(seed=23)
    model.layers[1].mlp_norm_scale = torch.ones(3)
    with pytest.raises(RuntimeError, match="layer 1 mlp_norm_scale"):
        fused.FusedStack(model)


def _head_with(target, **settings):
    head = tiny_drafter(target)
    cfg = DrafterConfig(**{**head.cfg.to_json(), **settings})
    other = MTPHead(cfg)
    state = {k: v for k, v in head.state_dict().items()}
    other.load_state_dict(state)
    return other.eval()


@pytest.mark.parametrize("settings", [
    dict(norm_offset=0.0), dict(out_norm=False), dict(layer_scalars=(0.5, 1.75)),
    dict(rope_partial_global=0.25),
    dict(norm_offset=0.0, out_norm=False, layer_scalars=(2.0, 0.25), rope_partial_global=0.5),
], ids=["norm_offset", "out_norm", "layer_scalars", "partial_rope", "all"])
def test_draft_step_honours_the_head_settings(settings):
    target = tiny_model(seed=24)
    head = _head_with(target, **settings)
    fast = fused.FusedDrafter(head, target, "clustered", share_screen=False)
    state = drafter_state(target, [9, 3, 14])
    token = torch.tensor([5, 6, 7])
    got = fast.step(token, state.hidden, state.positions, state.positions, state.cache)
    kv = [(state.cache.k[layer, :3], state.cache.v[layer, :3]) for layer in head.cfg.target_layers]
    with torch.no_grad():
        want = head.step(target.embed_tokens(token)[:, None], state.hidden[:, None],
                         state.positions[:, None], state.positions[:, None], kv)[:, 0]
    assert_close(got, want)


def test_draft_step_refuses_what_it_cannot_run():
    target = tiny_model(seed=25)
    cfg = DrafterConfig(**{**tiny_drafter(target).cfg.to_json(), "lm_head_source": "draft"})
    head = MTPHead(cfg).eval()
    with pytest.raises(RuntimeError, match="lm_head_source"):
        fused.FusedDrafter(head, target, "clustered")
