"""Tiny random models of every native decoder family, as transformers models, HF folders and GGUFs.

``family_model(case)`` builds a transformers model of one case (Llama, Llama with llama3 rope
scaling, Mistral with a small sliding window, Qwen2 with QKV bias, a tied head and linear rope
scaling, Qwen3 with QK-norm, Gemma 2 with both soft-caps and alternating sliding layers, Gemma 3
with its sliding pattern and linear scaling of its global layers) with random weights (norm scales
and biases included) and eager attention, so its logits are the reference. ``write_gguf`` writes
the same weights as llama.cpp's converter lays them out (Gemma norms stored as ``1 + w``;
Llama/Mistral q/k rows interleaved for llama.cpp's rotary; Llama 3.1 rope scaling as a
``rope_freqs`` divisor table; linear scaling as metadata), with a minimal tokenizer and any mix of
block types (``random_k_quant`` makes valid blocks of the K-quants the gguf package cannot
quantize). ``decode_blocks`` decodes every supported block type from its layout, and
``gguf_table``/``gguf_tensor_table`` locate tensors and table fields in a file. All of it is
written from the formats' descriptions, not taken from ``mtpspec``, so the tests check one against
the other.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tiny_gemma4 import VOCAB, randomize

CASES = ("llama", "llama3-rope", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
WINDOW = 8  # sliding window of Mistral, Gemma 2 and Gemma 3 cases: it matters within 32 tokens
GEMMA3_LAYERS = ["sliding_attention"] * 5 + ["full_attention"]  # llama.cpp's fixed pattern of 6


def family_config(case: str):
    """The transformers config of one tiny case (hidden 64, 4 heads / 2 kv heads of 16)."""
    import transformers

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=512, eos_token_id=1, bos_token_id=2, pad_token_id=0,
                rms_norm_eps=1e-6)
    if case == "llama":
        return transformers.LlamaConfig(**base, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default",
                                                         "rope_theta": 500.0})
    if case == "llama3-rope":
        return transformers.LlamaConfig(**base, tie_word_embeddings=False,
                                        rope_parameters=dict(LLAMA3_ROPE))
    if case == "mistral":
        return transformers.MistralConfig(**base, sliding_window=WINDOW, tie_word_embeddings=False)
    if case == "qwen2":
        return transformers.Qwen2Config(**base, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                         "rope_theta": 10_000.0})
    if case == "qwen3":
        return transformers.Qwen3Config(**base, tie_word_embeddings=False)
    if case == "gemma2":
        base.update(num_hidden_layers=4)
        return transformers.Gemma2Config(**base, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                         attn_logit_softcapping=4.0, final_logit_softcapping=8.0,
                                         hidden_activation="gelu_pytorch_tanh")
    if case == "gemma3":
        base.update(num_hidden_layers=len(GEMMA3_LAYERS))
        return transformers.Gemma3TextConfig(**base, sliding_window=WINDOW,
                                             layer_types=list(GEMMA3_LAYERS),
                                             query_pre_attn_scalar=16, rope_parameters={
                                                 "full_attention": {"rope_type": "linear",
                                                                    "factor": 8.0,
                                                                    "rope_theta": 1_000_000.0},
                                                 "sliding_attention": {"rope_type": "default",
                                                                       "rope_theta": 10_000.0}},
                                             hidden_activation="gelu_pytorch_tanh")
    raise KeyError(case)


def causal_lm_class(config):
    import transformers

    return {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
            "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
            "gemma2": transformers.Gemma2ForCausalLM,
            "gemma3_text": transformers.Gemma3ForCausalLM}[config.model_type]


def build(config, seed: int = 0):
    """A randomized eager-attention model of ``config``."""
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = causal_lm_class(config)(config)
    model.config._attn_implementation = "eager"
    randomize(model, seed)
    if config.model_type.startswith("gemma"):  # Gemma's norm scale is 1 + w: keep it near 1
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.ndim == 1 and "norm" in name:
                    param.sub_(1.0)
    return model


def family_model(case: str, seed: int = 0):
    return build(family_config(case), seed)


def gguf_reference(model):
    """The transformers model a GGUF of ``model``'s weights describes: llama.cpp's Gemma 2 has no
    ``query_pre_attn_scalar`` key and scales queries by head_dim ** -0.5 (all but the 27B)."""
    if model.config.model_type != "gemma2":
        return model
    config = model.config.__class__(**{**model.config.to_dict(),
                                       "query_pre_attn_scalar": model.config.head_dim})
    twin = build(config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


# --- GGUF writing -------------------------------------------------------------------------------

GGUF_ARCH = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma2": "gemma2", "gemma3_text": "gemma3"}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str, sandwich: bool) -> str:
    """llama.cpp's name of an HF tensor (``post_attention_layernorm`` is the pre-MLP norm
    ``ffn_norm`` in Llama-style models, Gemma's post-attention norm in sandwich ones)."""
    top = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    if module == "post_attention_layernorm":
        short = "post_attention_norm" if sandwich else "ffn_norm"
    else:
        short = _LAYER[module]
    return f"blk.{layer}.{short}.{kind}"


def interleave_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rotate-half rows (per head: the first halves of all pairs, then the second halves) to
    llama.cpp's interleaved layout (x0, y0, x1, y1, ...)."""
    head_dim = weight.shape[0] // heads
    half = head_dim // 2
    order = [h * head_dim + j * half + i for h in range(heads) for i in range(half) for j in (0, 1)]
    return weight[order]


def llama3_rope_divisors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3.1's scaling as llama.cpp stores it: one divisor per rotary frequency."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (2 * i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """``model``'s weights under llama.cpp's names and conventions, float32."""
    cfg = model.config
    family = GGUF_ARCH[cfg.model_type]
    sandwich = family.startswith("gemma")
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.detach().float().numpy().copy()
        if sandwich and name.endswith("norm.weight"):
            array = array + 1.0  # llama.cpp stores Gemma's RMSNorm scale as 1 + w
        if family in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            array = interleave_rotary_rows(array, heads)
        out[gguf_name(name, sandwich)] = array
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = llama3_rope_divisors(rope, cfg.head_dim)
    return out


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of VOCAB pieces: specials, 256 byte pieces, characters."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2] + [6] * 256
    chars = [chr(c) for c in range(33, 127)]
    pieces = ["\u2581"] + chars + ["\u2581" + c for c in chars]
    pieces += [a + b for a in "etaoinshr" for b in "etaoinshr"]
    tokens += pieces[: VOCAB - len(tokens)]
    types += [1] * (VOCAB - len(types))
    scores = [0.0] * 260 + [-float(i) for i in range(VOCAB - 260)]
    return tokens, scores, types


def bpe_vocab() -> tuple[list[str], list[str], list[int]]:
    """A GPT-2-style byte-level vocabulary of VOCAB tokens: specials, 256 bytes, merged pairs."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    tokens = ["<pad>", "<eos>", "<bos>"] + [chars[b] for b in range(256)]
    types = [3, 3, 3] + [1] * 256
    letters = "etaoinshrdlu"
    merges = [f"{a} {b}" for a in letters for b in letters]
    merges = merges[: VOCAB - len(tokens)]
    tokens += [m.replace(" ", "") for m in merges]
    types += [1] * len(merges)
    filler = VOCAB - len(tokens)
    tokens += [f"<extra_{i}>" for i in range(filler)]
    types += [4] * filler  # user-defined
    return tokens, merges, types


def write_gguf(path: Path, model, types: dict[str, object] | None = None,
               tokenizer: str = "llama", arch: str | None = None,
               encode=None, extra: dict[str, object] | None = None) -> Path:
    """Write ``model`` as a GGUF file at ``path``.

    types: tensor name -> a ``gguf.GGMLQuantizationType`` (default F32 for everything);
    encode: (name, float array, type) -> the raw block bytes ``[rows, bytes]`` of a type the gguf
    package cannot quantize (the K-quants). arch: overrides ``general.architecture``; extra:
    metadata written instead of (or besides) the usual keys.
    """
    import gguf
    from gguf.quants import quantize

    cfg = model.config
    family = GGUF_ARCH[cfg.model_type]
    arch = arch or family
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)
    meta = {"general.name": f"tiny-{family}"}
    meta.update({f"{arch}.{name}": value for name, value in {
        "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "rope.freq_base": float(rope.get("rope_theta", 10_000.0)),
    }.items()})
    if rope.get("rope_type") == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(rope["factor"])
    if getattr(cfg, "sliding_window", None):
        meta[f"{arch}.attention.sliding_window"] = cfg.sliding_window
    if family == "gemma2":
        meta[f"{arch}.attn_logit_softcapping"] = float(cfg.attn_logit_softcapping)
        meta[f"{arch}.final_logit_softcapping"] = float(cfg.final_logit_softcapping)
    if tokenizer == "llama":
        tokens, scores, token_types = spm_vocab()
        meta.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                     "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": token_types,
                     "tokenizer.ggml.unknown_token_id": 3})
    else:
        tokens, merges, token_types = bpe_vocab()
        meta.update({"tokenizer.ggml.model": "gpt2",
                     "tokenizer.ggml.pre": "qwen2" if family.startswith("qwen") else "default",
                     "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
                     "tokenizer.ggml.token_type": token_types})
    meta.update({"tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
                 "tokenizer.ggml.padding_token_id": 0})
    meta.update(extra or {})
    writer = gguf.GGUFWriter(str(path), arch)
    for name, value in meta.items():
        if isinstance(value, str):
            writer.add_string(name, value)
        elif isinstance(value, list):
            writer.add_array(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
        else:
            writer.add_uint32(name, value)
    for name, array in gguf_tensors(model).items():
        kind = (types or {}).get(name, gguf.GGMLQuantizationType.F32)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            try:
                raw = quantize(array, kind)
            except NotImplementedError:
                raw = encode(name, array, kind)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- block types the gguf package cannot quantize -----------------------------------------------

K_BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # per 256 weights


def random_k_quant(array: np.ndarray, kind, seed: int = 0) -> np.ndarray:
    """Valid K-quant blocks ``[rows, bytes]`` for a tensor of ``array``'s shape: random quants
    and sub-block scales, block scales chosen so weights are about N(0, 1/fan_in) in size. (The
    gguf package only dequantizes these types; the reference is what it makes of these bytes.)"""
    rows, cols = array.shape
    size = K_BLOCK_BYTES[kind.name]
    blocks = cols // 256
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    target = 1.0 / np.sqrt(cols)
    if kind.name == "Q6_K":  # ql[128] qh[64] scales[16] (int8) d (f16): d * scale * (q - 32)
        d = np.full((rows, blocks, 1), target / 1000, np.float16)
        raw[..., 208:210] = d.view(np.uint8)
    else:  # d (f16), dmin (f16), 6-bit scales and mins, quants: d * sc * q - dmin * m
        levels = 15.5 if kind.name == "Q4_K" else 31.5  # dmin = d * levels / 2 centres q
        d = np.full((rows, blocks), target / (32 * levels), np.float16)
        raw[..., 0:2] = d[..., None].view(np.uint8)
        raw[..., 2:4] = (d * levels / 2).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, blocks * size)


def gguf_tensor_table(path: Path) -> dict[str, dict]:
    """Where each tensor's table entry sits in a GGUF file: {name: {type_at, offset_at, dims_at,
    n_dims}} (byte offsets of its block-type, data-offset, dimension-count fields), so tests can
    corrupt single fields."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data
    out = {}
    for tensor in reader.tensors:
        _, _, dims, _, kind, offset = tensor.field.parts[:6]
        out[tensor.name] = {"type_at": kind.ctypes.data - base,
                            "offset_at": offset.ctypes.data - base,
                            "dims_at": dims.ctypes.data - base, "n_dims": int(dims[0])}
    del reader
    return out


# --- block decoders written from the GGUF block layouts, to check the loader's against ---------

def _f16(raw: np.ndarray) -> np.ndarray:
    """float32 of little-endian fp16 fields ``[..., 2]`` (uint8) -> ``[..., 1]``."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs packed in 12 bytes ``[..., 12]`` -> two ``[..., 8]``."""
    s = scales.astype(np.int32)
    sc = np.empty(s.shape[:-1] + (8,), np.int32)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def decode_blocks(raw: np.ndarray, kind: str) -> np.ndarray:
    """Float32 weights ``[rows, cols]`` of block bytes ``[rows, bytes]`` of block type ``kind``."""
    rows = raw.shape[0]
    if kind == "F32":
        return np.ascontiguousarray(raw).view(np.float32).reshape(rows, -1)
    if kind == "F16":
        return np.ascontiguousarray(raw).view(np.float16).astype(np.float32).reshape(rows, -1)
    if kind == "BF16":
        bits = np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(rows, -1)
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176,
            "Q6_K": 210}[kind]
    b = raw.reshape(rows, -1, size)  # [rows, blocks, bytes]
    if kind == "Q8_0":  # d, 32 x int8
        out = _f16(b[..., 0:2]) * b[..., 2:].view(np.int8).astype(np.float32)
    elif kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):  # d, (m), (32 high bits), 16 bytes of nibbles
        offset = 4 if kind in ("Q4_1", "Q5_1") else 2
        high = kind.startswith("Q5")
        qs = b[..., offset + 4 * high:].astype(np.int32)  # [.., 16]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # element j and j + 16
        if high:
            bits = b[..., offset:offset + 4].copy().view(np.uint32).astype(np.int64)  # [.., 1]
            q = q | (((bits >> np.arange(32)) & 1) << 4)
        d = _f16(b[..., 0:2])
        if offset == 4:
            out = d * q + _f16(b[..., 2:4])
        else:
            out = d * (q - (16 if high else 8))
    elif kind in ("Q4_K", "Q5_K"):  # d, dmin, scales[12], (qh[32]), qs[128]: 8 sub-blocks of 32
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scales(b[..., 4:16])
        qs = b[..., 16 + 32 * (kind == "Q5_K"):].astype(np.int32).reshape(rows, -1, 4, 32)
        q = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(rows, -1, 8, 32)  # sub-block 2i, 2i+1
        if kind == "Q5_K":
            qh = b[..., 16:48].astype(np.int32)[..., None, :]  # [.., 1, 32]
            q = q + (((qh >> np.arange(8)[:, None]) & 1) << 4)
        out = d[..., None] * sc[..., None] * q - dmin[..., None] * mn[..., None]
    else:  # Q6_K: ql[128], qh[64], scales[16] (int8), d; two halves of 128
        ql = b[..., 0:128].astype(np.int32).reshape(rows, -1, 2, 2, 32)  # [half, lo/hi 32, l]
        qh = b[..., 128:192].astype(np.int32).reshape(rows, -1, 2, 1, 32)
        scales = b[..., 192:208].view(np.int8).astype(np.float32).reshape(rows, -1, 2, 8)
        d = _f16(b[..., 208:210])
        low = np.concatenate([ql & 0xF, ql >> 4], axis=3)  # [.., half, 4 quarters, 32]
        shifts = np.array([0, 2, 4, 6]).reshape(4, 1)
        q = (low | (((qh >> shifts) & 3) << 4)) - 32  # quarter k: shift 2k
        sub = scales.reshape(rows, -1, 2, 4, 2)[..., None]  # [.., half, quarter, 16-group]
        out = d[..., None, None, None] * sub * q.reshape(rows, -1, 2, 4, 2, 16)
    return out.reshape(rows, -1).astype(np.float32)


def gguf_table(path: Path) -> tuple[list[tuple[str, tuple[int, ...], int, int]], int]:
    """The tensor table of a GGUF file, walked with ``struct`` (``gguf.GGUFReader`` takes
    seconds on a 262k-token vocabulary): [(name, (ne0, ne1, ...), block type id, offset)] and
    the file offset where tensor data starts."""
    import struct

    data = Path(path).read_bytes()
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(pos):
        (length,) = struct.unpack_from("<Q", data, pos)
        return data[pos + 8:pos + 8 + length].decode(), pos + 8 + length

    def skip(pos, kind):
        if kind in sizes:
            return pos + sizes[kind]
        if kind == 8:
            return string(pos)[1]
        item, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if item in sizes:
            return pos + count * sizes[item]
        for _ in range(count):
            pos = skip(pos, item)
        return pos

    _, tensors, kvs = struct.unpack_from("<IQQ", data, 4)
    pos, alignment = 24, 32
    for _ in range(kvs):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", data, pos + 4)
        pos = skip(pos + 4, kind)
    table = []
    for _ in range(tensors):
        name, pos = string(pos)
        (dims,) = struct.unpack_from("<I", data, pos)
        shape = struct.unpack_from(f"<{dims}Q", data, pos + 4)
        kind, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * dims)
        pos += 4 + 8 * dims + 12
        table.append((name, tuple(shape), kind, offset))
    return table, -(-pos // alignment) * alignment
