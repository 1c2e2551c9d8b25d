"""Text <-> token ids for the target model, without transformers at run time.

Two sources are supported:

* a GGUF file. SentencePiece-style metadata (Gemma, Llama 2, Mistral: a token list, scores and
  token types, no merges) or GPT-2-style byte-level BPE (Llama 3, Qwen, SmolLM: tokens, merges
  and a named pre-tokenizer). We rebuild the equivalent Hugging Face ``tokenizers`` model from it
  and cache it as ``tokenizer.json`` plus a small ``tokenizer_meta.json`` so later loads skip the
  rebuild;
* a Hugging Face folder (``tokenizer.json`` + ``tokenizer_config.json`` and friends).

``StreamDecoder`` turns ids into text one at a time without ever emitting half of a UTF-8 character
(byte-fallback tokens like ``<0xE2>``). Chat templates are rendered with jinja2 in a sandbox, the way
transformers does. This module must not import transformers or torch: it is on the start-up path.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as BackendTokenizer

from mtpspec.gguf_file import read_gguf_metadata

CACHE_FORMAT = 2  # bump when the cached tokenizer.json would change for the same GGUF
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
# Control tokens that end a chat turn; generation stops on them as well as on the eos token.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>")
GEMMA_SPM_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gemma3n")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class NoChatTemplateError(ValueError):
    """The model ships no chat template, so chat messages cannot be rendered."""


class UnsupportedTokenizerError(ValueError):
    """The GGUF describes a tokenizer kind this module cannot rebuild."""


@dataclass(frozen=True)
class Tokenizer:
    """A ``tokenizers`` backend plus the few facts generation needs (bos, end tokens, template)."""

    backend: BackendTokenizer
    bos_id: int | None  # prepended by encode(add_bos=True); None when the model has no bos token
    eos_ids: tuple[int, ...]  # any of these ends generation
    chat_template: str | None
    name: str  # model name, for messages
    special_tokens: tuple[tuple[str, str], ...] = ()  # (("bos_token", "<bos>"), ...) for templates

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<start_of_turn>``) stay whole."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, skipping special tokens (``<bos>``, ``<eos>``, ...)."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, s: str) -> int | None:
        return self.backend.token_to_id(s)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the model's own template.

        The result usually begins with the bos token already, so encode it with ``add_bos=False``.
        """
        if self.chat_template is None:
            raise NoChatTemplateError(
                f"Model {self.name!r} has no chat template (it is probably a base model); "
                "pass a plain prompt instead of chat messages."
            )
        template = _compile_template(self.chat_template)
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **dict(self.special_tokens)
        )

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    @cached_property
    def held_ids(self) -> frozenset[int]:
        """Ids after which streamed text may still change: byte-fallback tokens (``<0xE2>``), whose
        run decodes as a whole, and special tokens, which decode to nothing."""
        byte_ids = (self.backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        special_ids = (i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)
        return frozenset(i for i in (*byte_ids, *special_ids) if i is not None)


class StreamDecoder:
    """Incremental detokenizer: ``push`` ids one by one, get back only final text.

    The pushed pieces joined (with ``flush``) always equal ``decode`` of all ids. Keeps a short
    window of ids (``prefix`` .. end) and decodes it whole each time, so context-dependent decoders
    work. Text is held back while it ends in U+FFFD (an unfinished UTF-8 sequence) or while the last
    id is a byte-fallback token: a run of byte tokens decodes as a whole, and a later invalid byte
    turns the entire run into U+FFFD. So a character spelled in bytes comes out one token late.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._held_ids = tokenizer.held_ids
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this have been emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it makes final (may be "")."""
        self._ids.append(token_id)
        if token_id in self._held_ids:
            return ""
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is held back (an unfinished character comes out as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        done = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if not final and (len(text) <= len(done) or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]


def user_prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of one user prompt in the model's serving format: one user message through its
    chat template when it has one (the template writes the bos token), else the completion framing
    ``Question: ...\nAnswer:`` that benchmarks and drafter training use for base models."""
    if tokenizer.chat_template is not None:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        return tokenizer.encode(rendered, add_bos=False)
    return tokenizer.encode(f"Question: {text}\nAnswer:")


# --- chat templates -------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    """The same jinja2 setup transformers uses, so templates written for it render identically."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# --- GGUF ---------------------------------------------------------------------------------------

def _spm_merges(tokens: list[str], vocab: dict[str, int]) -> list[str] | list[list[str]]:
    """BPE merges implied by a SentencePiece vocabulary, ``tokens`` in merge order (Gemma: file
    order; others: by score, highest first).

    Every split ``left + right`` of a token with both halves in the vocabulary is a merge. Merges
    rank by the token's position, then by longer ``left`` first: the order transformers' converter
    produces (its sort by score, then length, is exactly this for Gemma's position scores).
    Written as "left right" strings when no token holds a space (a quarter faster to load),
    else as pairs.
    """
    as_pairs = any(" " in token for token in tokens)
    merges = []
    for token in tokens:
        for cut in range(len(token) - 1, 0, -1):
            left = token[:cut]
            if left in vocab:
                right = token[cut:]
                if right in vocab:
                    merges.append([left, right] if as_pairs else f"{left} {right}")
    return merges


def _added_token(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": special}


def build_gemma_tokenizer_json(metadata: dict[str, object]) -> dict:
    """The ``tokenizer.json`` document for a SentencePiece GGUF (Gemma's, Llama 2's, Mistral's).

    BPE with byte fallback over the file's tokens; spaces become "▁" before the model sees them
    (and one "▁" is prepended when ``tokenizer.ggml.add_space_prefix``, as Llama 2's does; Gemma's
    does not). Merge order: Gemma's file order is its merge order; other files rank by score.
    Tokens made only of whitespace that contain a space are stored with real spaces in the file
    but looked up as "▁" runs, so they are respelled. Control tokens are special added tokens;
    user-defined ones (``\\n\\n``, ``<start_of_image>``) are plain added tokens matched whole.
    """
    raw_tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(raw_tokens)
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in raw_tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UnsupportedTokenizerError("the GGUF vocabulary has duplicate tokens")
    added = [
        _added_token(i, raw, special=kind == _CONTROL)
        for i, (raw, kind) in enumerate(zip(raw_tokens, types))
        if kind == _CONTROL or (kind == _USER_DEFINED and raw in vocab)
    ]
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    gemma = metadata.get("general.architecture") in GEMMA_SPM_ARCHITECTURES
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", not gemma))
    ordered = tokens
    if not gemma and metadata.get("tokenizer.ggml.scores"):
        scores = metadata["tokenizer.ggml.scores"]
        ordered = [tokens[i] for i in sorted(range(len(tokens)), key=lambda i: -scores[i])]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer = ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]}
                  if prefix else replace)
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    post_processor = None
    if bos_id is not None and metadata.get("tokenizer.ggml.add_bos_token", True):
        bos = {"SpecialToken": {"id": tokens[bos_id], "type_id": 0}}
        post_processor = {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": tokens[bos_id], "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[bos_id]: {"id": tokens[bos_id], "ids": [bos_id],
                                                "tokens": [tokens[bos_id]]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": None if prefix else {"type": "Split", "pattern": {"String": " "},
                                              "behavior": "MergedWithPrevious", "invert": False},
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None,
                  "unk_token": tokens[unk_id] if unk_id is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": _spm_merges(ordered, vocab)},
    }


# Pre-tokenizer split patterns of GPT-2-style byte-level BPE vocabularies, by ``tokenizer.ggml.pre``
# (published in each model's tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": use_regex}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


BPE_PRE_TOKENIZERS = {
    "default": _byte_level(True), "gpt-2": _byte_level(True), "gpt2": _byte_level(True),
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(True)]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_SPLIT), _byte_level(False)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(_QWEN2_SPLIT), _byte_level(False)]},
}


def build_bpe_tokenizer_json(metadata: dict[str, object]) -> dict:
    """The ``tokenizer.json`` document for a GPT-2-style byte-level BPE GGUF (``gpt2`` model):
    its vocabulary and merges as stored, the pre-tokenizer its ``tokenizer.ggml.pre`` names,
    control tokens as special added tokens, user-defined ones as plain added tokens."""
    pre = str(metadata.get("tokenizer.ggml.pre") or "default")
    if pre not in BPE_PRE_TOKENIZERS:
        raise UnsupportedTokenizerError(
            f"byte-level BPE pre-tokenizer {pre!r} is not supported (supported: "
            f"{', '.join(sorted(BPE_PRE_TOKENIZERS))}); use a Hugging Face folder with a tokenizer.json")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = metadata.get("tokenizer.ggml.merges")
    if not merges:
        raise UnsupportedTokenizerError("the GGUF's BPE tokenizer has no merges")
    vocab = {token: index for index, token in enumerate(tokens)}
    added = [_added_token(i, token, special=kind == _CONTROL)
             for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (_CONTROL, _USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"} if pre == "qwen2" else None,
        "pre_tokenizer": BPE_PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": pre == "llama-bpe",
                  "vocab": vocab, "merges": [m.split(" ", 1) for m in merges]},
    }


def _gguf_meta(metadata: dict[str, object], source: dict) -> dict:
    """The small facts cached next to tokenizer.json: ids, template, name and the source's stamp."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    eos_ids = [metadata.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    eos_ids += [i for i, (t, kind) in enumerate(zip(tokens, types))
                if kind == _CONTROL and t in END_OF_TURN_TOKENS]
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    special = {
        name: tokens[metadata[key]]
        for name, key in (("bos_token", "tokenizer.ggml.bos_token_id"),
                          ("eos_token", "tokenizer.ggml.eos_token_id"),
                          ("unk_token", "tokenizer.ggml.unknown_token_id"),
                          ("pad_token", "tokenizer.ggml.padding_token_id"))
        if metadata.get(key) is not None
    }
    return {
        "format": CACHE_FORMAT,
        "source": source,
        "name": metadata.get("general.name") or source["name"],
        "bos_id": bos_id if metadata.get("tokenizer.ggml.add_bos_token", True) else None,
        "eos_ids": list(dict.fromkeys(i for i in eos_ids if i is not None)),
        "chat_template": metadata.get("tokenizer.chat_template"),
        "special_tokens": special,
    }


def _source_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a concurrent reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _from_meta(backend: BackendTokenizer, meta: dict) -> Tokenizer:
    return Tokenizer(
        backend=backend,
        bos_id=meta["bos_id"],
        eos_ids=tuple(meta["eos_ids"]),
        chat_template=meta["chat_template"],
        name=meta["name"],
        special_tokens=tuple(sorted(meta["special_tokens"].items())),
    )


def _load_cached(cache_dir: Path, stamp: dict) -> Tokenizer | None:
    """The cached tokenizer if it was built by this code from this very file, else None."""
    meta_path, json_path = cache_dir / META_FILE, cache_dir / TOKENIZER_FILE
    if not (meta_path.is_file() and json_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("source") != stamp:
        return None
    return _from_meta(BackendTokenizer.from_file(str(json_path)), meta)


def load_tokenizer_gguf(gguf_path: str | os.PathLike, cache_dir: Path) -> Tokenizer:
    """Tokenizer of a GGUF model, rebuilt from its metadata once and then loaded from ``cache_dir``.

    The cache is keyed on the GGUF's file name, size and mtime, and is rebuilt when they change.
    """
    gguf_path, cache_dir = Path(gguf_path), Path(cache_dir)
    stamp = _source_stamp(gguf_path)
    cached = _load_cached(cache_dir, stamp)
    if cached is not None:
        return cached
    metadata = read_gguf_metadata(gguf_path)
    kind = metadata.get("tokenizer.ggml.model")
    builders = {"llama": build_gemma_tokenizer_json, "gpt2": build_bpe_tokenizer_json}
    if kind not in builders:
        raise UnsupportedTokenizerError(
            f"{gguf_path.name}: cannot rebuild tokenizer {kind!r}; SentencePiece ('llama') and "
            "byte-level BPE ('gpt2') tokenizers are supported. Use a Hugging Face folder with a "
            "tokenizer.json instead."
        )
    document = json.dumps(builders[kind](metadata), ensure_ascii=False)
    meta = _gguf_meta(metadata, stamp)
    backend = BackendTokenizer.from_str(document)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(cache_dir / TOKENIZER_FILE, document)
    _write_atomic(cache_dir / META_FILE, json.dumps(meta, ensure_ascii=False, indent=1))
    return _from_meta(backend, meta)


# --- Hugging Face folders -------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _hf_chat_template(folder: Path, config: dict) -> str | None:
    """From tokenizer_config.json (a string or a list of named templates), or a template file."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    return template


def load_tokenizer_hf(folder: Path) -> Tokenizer:
    """Tokenizer of a Hugging Face model folder.

    Needs ``tokenizer.json``. bos/eos come from ``tokenizer_config.json`` (or
    ``special_tokens_map.json``); ``generation_config.json`` and ``config.json`` may add eos ids,
    and the end-of-turn tokens in END_OF_TURN_TOKENS are added when the vocabulary has them.
    """
    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {TOKENIZER_FILE}")
    backend = BackendTokenizer.from_file(str(folder / TOKENIZER_FILE))
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        content = _token_content(config.get(name)) or _token_content(special_map.get(name))
        if content is not None:
            special[name] = content
    bos = special.get("bos_token")
    bos_id = backend.token_to_id(bos) if bos is not None and config.get("add_bos_token", True) else None
    eos_ids = [backend.token_to_id(special["eos_token"])] if "eos_token" in special else []
    for extra in ("generation_config.json", "config.json"):
        eos_ids += _as_id_list(_read_json(folder / extra).get("eos_token_id"))
    eos_ids += [backend.token_to_id(t) for t in END_OF_TURN_TOKENS]
    return Tokenizer(
        backend=backend,
        bos_id=bos_id,
        eos_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        chat_template=_hf_chat_template(folder, config),
        name=folder.name,
        special_tokens=tuple(sorted(special.items())),
    )
