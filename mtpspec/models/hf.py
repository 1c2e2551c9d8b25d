"""Any Hugging Face causal LM as a target: a thin adapter around a transformers model.

The native model (``models/decoder.py``) is the fast path for the families
of ``families``; every other architecture transformers knows, and any folder with ``--backend hf``
(Gemma 4 text included), runs through this adapter, with the same interface the engine, the
proposers and the trainer use:

    forward(ids [B, T], positions [B, T], cache, num_logits) -> (logits [B, n, V] | None,
                                                                  hidden [B, T, d] after the final norm)
    new_cache(batch, max_len), embed_tokens(ids), lm_head(hidden), embed.rows(ids), config

The cache is ours (``HFKVCache``): per-layer buffers ``[B, kv_heads, max_len, head_dim]`` allocated
on first write, slot = position, so rolling back is a length move exactly as with ``KVCache``.
During a forward pass a ``transformers.Cache`` adapter (``_SlotWriter``) writes each layer's new
keys/values into those slots and hands the model the buffer up to the last position; the attention
masks are explicit (causal, plus the window on sliding layers), so stale slots are never read.
Layers that reuse another layer's K/V (Gemma 4's KV sharing) write nothing; ``cache.k[layer]``
resolves them to the layer that produced it. transformers is used here, never in the drafter.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from mtpspec.config import ModelConfig
from mtpspec.families import family_for_hf
from mtpspec.kv_cache import CacheFullError, KVCache
from mtpspec.loading import ModelLoadError, file_sha256

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err.msg})") from err


def model_type_of(raw: dict) -> str:
    """The text model's type: ``text_config.model_type`` for multimodal folders."""
    text = raw.get("text_config") or {}
    return str(text.get("model_type") or raw.get("model_type") or "")


def is_native(folder: Path) -> bool:
    """Whether ``folder`` holds an architecture with a native implementation (``families``)."""
    return family_for_hf(model_type_of(read_hf_config(folder))) is not None


def folder_hash(folder: Path) -> str:
    """sha256 over the weight files' sha256s (the same rule as ``loading.load_hf_folder``)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weight files")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


class LayerStack:
    """Per-layer buffers that index like a stacked ``[L, B, kvh, S, D]`` tensor.

    ``k[layer, ...]`` is one layer's buffer (a layer that reuses another's K/V resolves to that
    layer's); ``k[:, ...]`` is a ``LayerView`` over every layer that owns a buffer, and assigning
    one view to another copies layer by layer (the batch session moves rows this way). Layers may
    differ in kv heads and head size (Gemma 4's global layers); buffers appear on first write.
    """

    def __init__(self, source: list[int], batch_size: int, max_len: int):
        self.buffers: list[torch.Tensor | None] = [None] * len(source)
        self.source = source  # layer -> the layer whose buffer holds its K/V
        self.batch_size, self.max_len = batch_size, max_len

    def ensure(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        """The buffer of ``layer``, allocated ``[B, kvh, S, D]`` after ``like`` ``[*, kvh, *, D]``."""
        if self.buffers[layer] is None:
            shape = (self.batch_size, like.shape[1], self.max_len, like.shape[3])
            with torch.inference_mode(False):  # a normal tensor: writable outside a forward too
                self.buffers[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.buffers[layer]

    def _owned(self) -> list[int]:
        return [i for i, src in enumerate(self.source) if src == i]

    def __getitem__(self, index):
        layer, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(layer, slice):
            if layer != slice(None):
                raise IndexError("only all layers (:) or one layer can be selected")
            return LayerView({i: self.buffers[i][rest] for i in self._owned()
                              if self.buffers[i] is not None})
        buffer = self.buffers[self.source[int(layer)]]
        if buffer is None:
            raise KeyError(f"layer {layer} has no K/V yet (nothing was run)")
        return buffer[rest] if rest else buffer

    def __setitem__(self, index, value: "LayerView") -> None:
        layer, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if layer != slice(None) or not isinstance(value, LayerView):
            raise IndexError("assign a LayerView to all layers (:)")
        for i, part in value.parts.items():  # part: [kvh, T, D] for one row, else [B, kvh, T, D]
            self.ensure(i, part if part.ndim == 4 else part[None])[rest] = part


class LayerView:
    """The same index applied to every layer's buffer: ``{layer: tensor}``."""

    def __init__(self, parts: dict[int, torch.Tensor]):
        self.parts = parts


class HFKVCache:
    """The ``KVCache`` contract for HF targets: slot = position, positions are the engine's."""

    def __init__(self, source: list[int], batch_size: int, max_len: int):
        self.k = LayerStack(source, batch_size, max_len)
        self.v = LayerStack(source, batch_size, max_len)
        self.max_len = max_len
        self.batch_size = batch_size

    check_room = KVCache.check_room  # the same message, on the same max_len

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[B, kvh, T, D]`` at ``positions`` ``[B, T]`` of ``layer``."""
        batch, steps = positions.shape
        start = int(positions[0, 0])
        block = bool((positions == start + torch.arange(steps, device=positions.device)).all())
        for stack, new in ((self.k, k), (self.v, v)):
            buffer = stack.ensure(layer, new)
            if block:  # the common case: one block at the same offset
                buffer[:batch, :, start:start + steps] = new
            else:
                rows = torch.arange(batch, device=positions.device)[:, None].expand(batch, steps)
                buffer.permute(0, 2, 1, 3)[rows, positions] = new.permute(0, 2, 1, 3)

    @property
    def nbytes(self) -> int:
        return sum(b.element_size() * b.numel() for stack in (self.k, self.v)
                   for b in stack.buffers if b is not None)


def _slot_writer_class():
    """A ``transformers.Cache`` that writes into an ``HFKVCache`` (built lazily: transformers is
    only imported when an HF target is used)."""
    from transformers.cache_utils import Cache

    class _SlotWriter(Cache):
        def __init__(self, cache: HFKVCache, positions: torch.Tensor, end: int):
            super().__init__(layers=[])
            self.target_cache, self.positions, self.end = cache, positions, end

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            # key_states/value_states [B, kvh, T, D] -> the buffer up to the last position
            self.target_cache.write(layer_idx, self.positions, key_states, value_states)
            batch = key_states.shape[0]
            return (self.target_cache.k.buffers[layer_idx][:batch, :, :self.end],
                    self.target_cache.v.buffers[layer_idx][:batch, :, :self.end])

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return int(self.positions.min())

        def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
            return self.end, 0

    return _SlotWriter


def _config_from_hf(text, name: str, kv_heads: int, head_dim: int) -> ModelConfig:
    """Our ``ModelConfig`` view of a transformers text config (shapes of the sliding layers)."""
    layer_types = tuple("sliding" if kind == "sliding_attention" else "global"
                        for kind in (getattr(text, "layer_types", None)
                                     or ["full_attention"] * text.num_hidden_layers))
    heads = text.num_attention_heads
    eos = getattr(text, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((int(eos),) if eos is not None else ())
    rope = getattr(text, "rope_parameters", None) or {}
    rope_of = lambda kind: (rope.get(kind) if isinstance(rope.get(kind), dict) else rope)  # noqa: E731
    window = getattr(text, "sliding_window", None)
    return ModelConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", 0) or 0,
        num_layers=text.num_hidden_layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6) or 1e-6),
        rope_theta_global=float(rope_of("full_attention").get("rope_theta", 1e6) or 1e6),
        rope_theta_local=float(rope_of("sliding_attention").get("rope_theta", 1e4) or 1e4),
        sliding_window=int(window or 1 << 30),
        query_pre_attn_scalar=float(getattr(text, "query_pre_attn_scalar", None) or head_dim),
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 32_768)),
        bos_token_id=int(getattr(text, "bos_token_id", None) or 0),
        eos_token_ids=eos_ids, pad_token_id=int(getattr(text, "pad_token_id", None) or 0),
        name=name, layer_types=layer_types,
    )


class _HeadRows:
    """``embed.rows(ids)`` / ``embed.dequantized()`` over the output head, as ``PackedLinear``."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [V, d]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float()

    def dequantized(self) -> torch.Tensor:
        return self.weight.detach()


class HFModel(nn.Module):
    """A transformers causal LM behind the native target interface (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, name: str = "hf", weight_format: str = "hf-fp32"):
        super().__init__()
        self.hf = hf_model.eval()
        self.text_config = hf_model.config.get_text_config()
        self.decoder = self._find_decoder(hf_model)
        self.config = _config_from_hf(self.text_config, name, *self.kv_shape(0))
        self.weight_format = weight_format
        self.embed = _HeadRows(hf_model.get_output_embeddings().weight)
        self.softcap = getattr(self.text_config, "final_logit_softcapping", None)
        self.window = getattr(self.text_config, "sliding_window", None)
        self.layer_kinds = list(getattr(self.text_config, "layer_types", None)
                                or ["full_attention"] * self.config.num_layers)
        self.kv_source = self._kv_sources()
        self._writer = _slot_writer_class()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @staticmethod
    def _find_decoder(hf_model: nn.Module) -> nn.Module:
        base = getattr(hf_model, "model", hf_model)
        return getattr(base, "language_model", None) or base

    def _kv_sources(self) -> list[int]:
        """Layer -> the layer whose K/V it attends to (itself, or Gemma 4's producer of its type)."""
        modes = getattr(self.text_config, "kv_sharing_modes", None)
        source = list(range(self.config.num_layers))
        if not modes:
            return source
        for layer, mode in enumerate(modes):
            if mode == "reuse":
                kind = self.layer_kinds[layer]
                source[layer] = max(i for i, m in enumerate(modes)
                                    if m != "reuse" and self.layer_kinds[i] == kind)
        return source

    def kv_shape(self, layer: int) -> tuple[int, int]:
        """(kv heads, head size) of the K/V that ``layer`` attends to."""
        text = self.text_config
        per_layer = getattr(text, "per_layer_config", None)
        text = per_layer[layer] if per_layer is not None else text
        heads = text.num_attention_heads
        return (getattr(text, "num_key_value_heads", None) or heads,
                getattr(text, "head_dim", None) or text.hidden_size // heads)

    def new_cache(self, batch_size: int = 1, max_len: int = 4096) -> HFKVCache:
        max_len = min(max_len, self.config.max_position_embeddings)
        return HFKVCache(self.kv_source, batch_size, max_len)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The model's input embeddings ``[*, d]`` (Gemma's include the sqrt(d) scale)."""
        return self.hf.get_input_embeddings()(token_ids).float()

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[*, V]`` float32 of final-normed hidden states ``[*, d]``."""
        head = self.hf.get_output_embeddings()
        logits = head(hidden.to(head.weight.dtype)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def screen_nbytes(self) -> int:
        return 0

    def enable_argmax_screen(self, ordering: torch.Tensor | None = None) -> None:
        return None  # the screen needs a packed int8 head (mtpspec.screen)

    @torch.no_grad()
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(hidden).argmax(-1)`` ``[*]`` for hidden ``[*, d]``."""
        return self.lm_head(hidden).argmax(dim=-1)

    def _masks(self, positions: torch.Tensor, end: int):
        """Boolean masks ``[B, 1, T, end]`` per layer kind: causal, and windowed when sliding."""
        slots = torch.arange(end, device=positions.device)
        query = positions.unsqueeze(-1)  # [B, T, 1]
        causal = slots <= query
        masks = {"full_attention": causal[:, None]}
        if self.window:
            masks["sliding_attention"] = (causal & (slots > query - self.window))[:, None]
        kinds = set(self.layer_kinds)
        if getattr(self.text_config, "layer_types", None) is not None:
            return {kind: masks.get(kind, masks["full_attention"]) for kind in kinds}
        # no per-layer types: one mask; a model-wide window (Mistral) applies to every layer
        return masks.get("sliding_attention", masks["full_attention"])

    @torch.inference_mode()
    def forward(self, token_ids, positions, cache: HFKVCache, num_logits: int | None = 1):
        """See the module docstring; positions of sequence b must be consecutive."""
        return self.forward_hidden(token_ids, positions, cache, num_logits)

    def forward_hidden(self, token_ids, positions, cache: HFKVCache, num_logits: int | None = 1):
        """``forward`` without inference mode, for callers that manage autograd themselves."""
        end = int(positions.max()) + 1
        if end > cache.max_len:
            cache.check_room(end)
        if int(positions.min()) < 0:
            raise CacheFullError("positions must be non-negative")
        writer = self._writer(cache, positions, end)
        out = self.decoder(input_ids=token_ids, position_ids=positions,
                           attention_mask=self._masks(positions, end), cache=writer,
                           use_cache=True)
        hidden = out.last_hidden_state.float()  # [B, T, d]
        if num_logits == 0:
            return None, hidden
        tail = hidden if num_logits is None else hidden[:, -num_logits:]
        return self.lm_head(tail), hidden


def load_hf_model(folder: str | Path, weights: str = "fp32") -> tuple[HFModel, str]:
    """An ``HFModel`` from a local Hugging Face folder, and the folder's weights hash."""
    folder = Path(folder)
    raw = read_hf_config(folder)
    if weights not in DTYPES:
        raise ModelLoadError(f"weight format {weights!r} is not available for Hugging Face "
                             f"targets (native Gemma 3 only); choose one of {', '.join(DTYPES)}")
    digest = folder_hash(folder)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ModelLoadError(f"{folder}: a {model_type_of(raw)!r} target needs transformers "
                             f"({err})") from err
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[weights],
                                                  attn_implementation="sdpa")
    except (ValueError, KeyError, OSError) as err:
        raise ModelLoadError(f"{folder}: transformers cannot load it as a causal LM "
                             f"({str(err).splitlines()[0]})") from err
    name = str(raw.get("_name_or_path") or folder.name)
    return HFModel(hf, name=name, weight_format=f"hf-{weights}"), digest
