"""Parity of the native Gemma 3 with Hugging Face transformers, both reading the same GGUF file.

transformers dequantizes the GGUF itself (its own loader, ~50 s), so this checks our GGUF reading,
name mapping and norm convention as well as the forward pass. Float32 on both sides.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.hf, pytest.mark.real]

PROMPTS = [
    "Question: What is the capital of France?\nAnswer:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The mitochondria is the powerhouse of the cell. In this essay, I will",
    "Translate to German: The weather is nice today.\n",
    "1, 2, 3, 5, 8, 13,",
    "Écris un poème sur la mer. 海は青い。",
]


@pytest.fixture(scope="module")
def models(real_target):
    transformers = pytest.importorskip("transformers")
    path = real_target.source
    torch.set_num_threads(2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()
    from mtpspec.loading import load_weights
    from mtpspec.models.decoder import DecoderModel

    loaded = load_weights(path)
    ours = DecoderModel(loaded.config, loaded.tensors, "fp32")
    return ours, hf, real_target.tokenizer


def test_logits_match_transformers(models):
    ours, hf, tokenizer = models
    text = " ".join(PROMPTS) * 12  # long enough to cross the 512-token sliding window
    ids = torch.tensor([tokenizer.encode(text)[:700]])
    with torch.no_grad():
        reference = hf(ids).logits[0]
    cache = ours.new_cache(1, 1024)
    logits, _ = ours(ids, torch.arange(ids.shape[1])[None], cache, num_logits=None)
    # float32 on both sides; only the order of accumulation differs (our AVX2 kernels)
    diff = (logits[0] - reference).abs()
    assert diff.max() / reference.abs().max() < 5e-4
    assert diff.mean() < 1e-4
    assert (logits[0].argmax(-1) == reference.argmax(-1)).float().mean() > 0.999


def test_greedy_continuations_match_transformers(models):
    from mtpspec.engine import Engine, GenerateOptions

    ours, hf, tokenizer = models
    engine = Engine(ours, tokenizer)
    options = GenerateOptions(max_new_tokens=64, ignore_eos=True)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            reference = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                    min_new_tokens=64)[0, len(ids):].tolist()
        assert engine.generate([ids], options)[0].token_ids == reference, prompt
