"""The decoding methods a benchmark compares, behind one small interface.

A ``Method`` turns a batch of prompts (token ids) into one ``Run`` per prompt: the generated ids,
their text, and the time spent in prefill and in decoding. ``EngineMethod`` wraps our engine (plain
decoding or any proposer); ``HFMethod`` wraps Hugging Face transformers' ``generate`` on the same
weights: ``hf`` in float32, ``hf-bf16`` in bfloat16 (transformers' fastest dtype on this CPU, about
2x float32 at batch 1 even without native bf16 arithmetic), ``hf-lookup`` float32 with
``prompt_lookup_num_tokens``. Methods only generate: ordering, warm-up and aggregation belong to
the runner and the report.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from mtpspec.config import ModelConfig
from mtpspec.engine import Engine, GenerateOptions
from mtpspec.loading import load_weights
from mtpspec.metrics import SpecStats
from mtpspec.proposers.factory import ProposerRequest, make_proposer, mtp_import_error, proposer_nbytes
from mtpspec.runtime import Target

HF_LOOKUP_TOKENS = 10  # prompt_lookup_num_tokens of ``hf-lookup``
HF_DTYPES = {"hf": torch.float32, "hf-bf16": torch.bfloat16, "hf-lookup": torch.float32}


@dataclass
class Run:
    """One prompt's generation by one method."""

    token_ids: list[int]       # generated tokens only (no prompt, no end-of-sequence token)
    text: str
    prefill_s: float           # prompt processing up to the first generated token
    decode_s: float            # everything after the first generated token
    decode_tokens: int         # tokens produced after the first one (what decode_s paid for)
    stats: SpecStats | None    # our engine's counters; None for transformers
    steps: int | None = None   # target forward passes in decode_s (transformers: streamer chunks)


class Method(Protocol):
    name: str                        # e.g. "plain", "ngram@k=4", "hf-lookup"
    base: str                        # the method without the k suffix: "plain", "ngram", ...
    draft_k: int | None              # None for methods without a draft length
    extra_memory_bytes: int | None   # memory this method adds over the target (None: unknown)

    def run(self, prompts: list[list[int]], options: GenerateOptions) -> list[Run]:
        """Generate for every prompt (a batch); one Run per prompt, in order."""
        ...


class EngineMethod:
    """Our engine with a fixed proposer (or none) and a fixed draft length."""

    def __init__(self, name: str, base: str, engine: Engine, draft_k: int | None):
        self.name, self.base, self.engine, self.draft_k = name, base, engine, draft_k

    @property
    def extra_memory_bytes(self) -> int:
        """The proposer's own weights and cache (read after a run, when its cache exists)."""
        # plus the argmax screen that speculative sessions build for verification (mtpspec.screen)
        screen = getattr(self.engine.model, "screen_nbytes", 0) if self.engine.proposer else 0
        return proposer_nbytes(self.engine.proposer, self.engine.model) + screen

    def run(self, prompts: list[list[int]], options: GenerateOptions) -> list[Run]:
        options = replace(options, draft_k=self.draft_k or 0)
        results = self.engine.generate(prompts, options)
        # a batch shares one prefill and one decode time: give each row a share by its tokens
        total_tokens = sum(max(len(r.token_ids) - 1, 0) for r in results)
        prompt_share = 1.0 / len(results)
        runs = []
        for result in results:
            stats = result.stats
            decode_tokens = max(len(result.token_ids) - 1, 0)
            share = decode_tokens / total_tokens if total_tokens else prompt_share
            runs.append(Run(token_ids=list(result.token_ids), text=result.text,
                            prefill_s=stats.prefill_s * prompt_share, decode_s=stats.decode_s * share,
                            decode_tokens=decode_tokens, stats=stats, steps=stats.steps))
        return runs


# --- Hugging Face transformers ------------------------------------------------------------------

def hf_config(config: ModelConfig):
    """A ``transformers.Gemma3TextConfig`` equal to our ModelConfig."""
    from transformers import Gemma3TextConfig

    if not float(config.query_pre_attn_scalar).is_integer():
        raise MethodError("transformers' Gemma3TextConfig needs an integer query_pre_attn_scalar")
    full = {"rope_type": "default", "rope_theta": config.rope_theta_global}
    if config.rope_scaling_factor != 1.0:
        full = {"rope_type": "linear", "rope_theta": config.rope_theta_global,
                "factor": config.rope_scaling_factor}
    return Gemma3TextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, sliding_window=config.sliding_window,
        query_pre_attn_scalar=int(config.query_pre_attn_scalar),
        rope_parameters={"full_attention": full,
                         "sliding_attention": {"rope_type": "default",
                                               "rope_theta": config.rope_theta_local}},
        layer_types=["full_attention" if config.is_global(i) else "sliding_attention"
                     for i in range(config.num_layers)],
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        bos_token_id=config.bos_token_id, eos_token_id=list(config.eos_token_ids),
        pad_token_id=config.pad_token_id, tie_word_embeddings=True,
    )


def build_hf_model(config: ModelConfig, tensors: dict[str, torch.Tensor],
                   dtype: torch.dtype = torch.float32):
    """``transformers.Gemma3ForCausalLM`` holding ``tensors`` (Hugging Face names), cast to ``dtype``."""
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM(hf_config(config))
    result = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [name for name in result.missing_keys if name != "lm_head.weight"]
    if missing:
        raise ValueError(f"weights lack {len(missing)} tensors transformers needs, e.g. {missing[0]}")
    model.tie_weights()
    return model.to(dtype).eval()


class _Clock:
    """A transformers streamer that only notes when each chunk of tokens arrives."""

    def __init__(self):
        self.times: list[float] = []
        self.counts: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.counts.append(int(value.numel()))

    def end(self) -> None:
        pass


class HFMethod:
    """``transformers`` ``generate`` one prompt at a time (prompt lookup needs batch size 1)."""

    def __init__(self, name: str, model, eos_ids: tuple[int, ...], pad_id: int,
                 lookup_tokens: int | None = None, decode=None):
        self.name, self.base, self.draft_k = name, name, lookup_tokens
        self.model, self.eos_ids, self.pad_id = model, eos_ids, pad_id
        self.lookup_tokens = lookup_tokens
        self.decode = decode  # ids -> text (the tokenizer's), or None
        self.extra_memory_bytes = sum(t.numel() * t.element_size() for t in model.parameters())

    def run(self, prompts: list[list[int]], options: GenerateOptions) -> list[Run]:
        return [self._run_one(prompt, options) for prompt in prompts]

    @torch.inference_mode()
    def _run_one(self, prompt: list[int], options: GenerateOptions) -> Run:
        params = options.sampling
        if params.seed is not None:
            torch.manual_seed(params.seed)
        sampling = {"do_sample": False} if params.greedy else {
            "do_sample": True, "temperature": params.temperature, "top_k": params.top_k,
            "top_p": params.top_p}
        lookup = {} if self.lookup_tokens is None else {"prompt_lookup_num_tokens": self.lookup_tokens}
        clock = _Clock()
        ids = torch.tensor([prompt])  # [1, T]
        start = time.perf_counter()
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=options.max_new_tokens,
            eos_token_id=list(self.eos_ids), pad_token_id=self.pad_id, streamer=clock,
            **sampling, **lookup)
        end = time.perf_counter()
        tokens = out[0, len(prompt):].tolist()
        for i, token in enumerate(tokens):
            if token in self.eos_ids:
                tokens = tokens[:i]
                break
        # clock.times[0] is the prompt itself; [1] the first generated chunk (prefill done)
        first = clock.times[1] if len(clock.times) > 1 else end
        first_count = clock.counts[1] if len(clock.counts) > 1 else 0
        decode_tokens = max(len(tokens) - first_count, 0)
        return Run(token_ids=tokens, text=self.decode(tokens) if self.decode else "",
                   prefill_s=first - start, decode_s=end - first, decode_tokens=decode_tokens,
                   stats=None, steps=max(len(clock.times) - 2, 0))


# --- building methods by name -------------------------------------------------------------------

METHODS = ("plain", "ngram", "draft-model", "mtp", "mtp-only", "hf", "hf-bf16", "hf-lookup")


class MethodError(ValueError):
    """A benchmark method that cannot be built; the message says why in one line."""


def method_problem(name: str) -> str | None:
    """Why method ``name`` cannot run in this environment, before any model is loaded."""
    if name not in METHODS:
        return f"unknown method {name!r}; choose from {', '.join(METHODS)}"
    if name in ("mtp", "mtp-only") and mtp_import_error() is not None:
        return f"method mtp: {mtp_import_error()}"
    if name.startswith("hf") and importlib.util.find_spec("transformers") is None:
        return f"method {name} needs transformers (pip install 'mtpspec[hf]')"
    return None


def _plain(base: str, draft_ks: tuple[int, ...], target: Target, request: ProposerRequest,
           max_len: int) -> list[Method]:
    return [EngineMethod(base, base, Engine(target.model, target.tokenizer, None, max_len), None)]


def _speculative(base: str, draft_ks: tuple[int, ...], target: Target, request: ProposerRequest,
                 max_len: int) -> list[Method]:
    """One method per draft length, sharing one proposer (runs never overlap)."""
    proposer = make_proposer(base, target, request).proposer
    engine = Engine(target.model, target.tokenizer, proposer, max_len)
    return [EngineMethod(base if len(draft_ks) == 1 else f"{base}@k={k}", base, engine, k)
            for k in draft_ks]


def _hf(base: str, draft_ks: tuple[int, ...], target: Target, request: ProposerRequest,
        max_len: int) -> list[Method]:
    model = build_hf_model(target.config, load_weights(target.source).tensors, HF_DTYPES[base])
    lookup = HF_LOOKUP_TOKENS if base == "hf-lookup" else None
    decode = target.tokenizer.decode if target.tokenizer is not None else None
    return [HFMethod(base, model, target.config.eos_token_ids, target.config.pad_token_id,
                     lookup, decode)]


_BUILDERS = {"plain": _plain, "ngram": _speculative, "draft-model": _speculative,
             "mtp": _speculative, "mtp-only": _speculative,
             "hf": _hf, "hf-bf16": _hf, "hf-lookup": _hf}


def build_methods(names: list[str], draft_ks: tuple[int, ...], target: Target,
                  request: ProposerRequest, max_len: int = 4096) -> list[Method]:
    """Methods by name, in order; speculative ones once per draft length (``ngram@k=4``)."""
    for name in names:
        problem = method_problem(name)
        if problem is not None:
            raise MethodError(problem)
    if not draft_ks:
        raise MethodError("need at least one draft length")
    built: list[Method] = []
    for name in names:
        built.extend(_BUILDERS[name](name, tuple(draft_ks), target, request, max_len))
    return built
