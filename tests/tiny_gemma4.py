"""Tiny random Hugging Face models for the HF-backend and Gemma 4 assistant tests.

Configurations are shaped like the real ones, only small: a Gemma 4 E2B/E4B-like target (per-layer
inputs, KV sharing, wider global heads, logit soft-capping) with an ordered-embedding (clustered)
assistant, and a 31B-like target (no sharing, ``attention_k_eq_v`` with more global kv heads) with a
dense-head assistant; plus Llama and Qwen 3 targets. Weights are random with unit-scale norms, so
greedy tokens are decided by clear margins. Each model is saved with ``save_pretrained`` (plus the
byte tokenizer of ``tiny_hf``) so our loaders read it from a folder, as they would real weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_hf import _tokenizer_json

VOCAB = 512
LAYER_TYPES = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + [
    "full_attention"]


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in), norm scales ~ 1, layer scalars 0.8, a random token ordering."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.fill_(0.8)
            elif name.endswith("token_ordering"):
                buffer.copy_(torch.randperm(buffer.numel(), generator=gen))
    return model.eval()


def gemma4_target_config(kind: str):
    from transformers import Gemma4TextConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=1, head_dim=16, global_head_dim=32,
                sliding_window=8, layer_types=LAYER_TYPES, max_position_embeddings=512,
                eos_token_id=1, bos_token_id=2, pad_token_id=0, final_logit_softcapping=30.0)
    if kind == "e2b":  # per-layer inputs, KV sharing in the last half, double-wide MLPs
        base.update(num_kv_shared_layers=3, hidden_size_per_layer_input=8,
                    vocab_size_per_layer_input=VOCAB, use_double_wide_mlp=True)
    else:  # 31B: every layer computes K/V; global layers with keys = values, 2 kv heads
        base.update(num_kv_shared_layers=0, hidden_size_per_layer_input=0,
                    attention_k_eq_v=True, num_global_key_value_heads=2)
    return Gemma4TextConfig(**base)


def assistant_config(kind: str, backbone: int = 64, vocab: int = VOCAB):
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    extra = {} if kind == "e2b" else dict(attention_k_eq_v=True, num_global_key_value_heads=2)
    text = Gemma4TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, global_head_dim=32,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, max_position_embeddings=512,
        **extra)
    return Gemma4AssistantConfig(text_config=text, backbone_hidden_size=backbone,
                                 use_ordered_embeddings=kind == "e2b", num_centroids=16,
                                 centroid_intermediate_top_k=4)


def save_with_tokenizer(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(_tokenizer_json(VOCAB))
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<bos>", "eos_token": "<eos>"}')
    return folder


def gemma4_target(kind: str, seed: int = 1):
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    return randomize(Gemma4ForCausalLM(gemma4_target_config(kind)), seed)


def gemma4_assistant(kind: str, seed: int = 2, **overrides):
    from transformers import Gemma4AssistantForCausalLM

    torch.manual_seed(seed)
    return randomize(Gemma4AssistantForCausalLM(assistant_config(kind, **overrides)), seed)


def llama_like(family: str, seed: int = 0):
    """A tiny Llama or Qwen 3 causal LM (untied output head)."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, max_position_embeddings=512, eos_token_id=1, bos_token_id=2,
                        pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return randomize(model_cls(config), seed)


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own plain greedy continuation."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens)
    return out[0, len(prompt):].tolist()
