"""Hugging Face ``datasets`` in and out of the recipe: prompt sources, and the target's responses
stored on disk, sharded and memory-mapped, reused by every later run.

Prompts: a folder written by ``Dataset.save_to_disk`` (a ``DatasetDict``: its ``train`` split),
a Parquet file, or a JSON/JSONL file, with ``--prompt-column`` naming a text column or a
messages column (a list of ``{"role", "content"}``: its first user turn is the prompt, which
``data.build_prompts`` formats through the target's chat template when it has one). Without a
column the fields ``data.py`` knows are tried on every row.

Responses (``WORK/dataset``): ``eval/`` the held-out greedy sequences, ``train/chunk-NNNNN/`` one
Arrow shard per generation batch, ``meta.json`` what wrote them (the target's weights hash) and
whether generation finished. Generation batch n is the same work whichever rank does it (its
prompts, its sampling choice and its seed depend on n only), so N ranks write the chunks one
process would, each chunk is written whole (renamed into place) and a killed run regenerates only
the chunks it had not finished. A token sequence is a row ``{ids, length}``; recorded target
states (``--gen-weights``) add their tensors as raw fp16/int32 bytes. An old ``WORK/data.pt``
(before this format) is converted once and left in place.
``datasets`` is imported only here and only when used (``pip install mtpspec[train]``).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mtpspec.drafter import distributed
from mtpspec.drafter.data import TargetStates, _text_of, generate_batch, generate_states
from mtpspec.sampling import SamplingParams

FOLDER = "dataset"       # under the work folder
FORMAT = "mtpspec-data-1"
MIN_RESPONSE = 8         # shorter responses teach little: not kept (as before)
EMPTY = "EMPTY"          # marks a chunk folder whose batch kept no sequence
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95)
# TargetStates fields stored as bytes: name -> dtype
_TENSORS = {"hidden": torch.float16, "keys": torch.float16, "values": torch.float16,
            "probs": torch.float16, "tops": torch.int32}


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError("training data is stored with Hugging Face datasets: "
                          "pip install 'mtpspec[train]' (or pip install datasets)") from err
    datasets.disable_progress_bars()  # the recipe draws its own
    return datasets


# --- prompts -------------------------------------------------------------------------------------

def read_prompts(source: str, column: str | None = None) -> list[str]:
    """Prompt texts from a dataset folder, a Parquet file or a JSON(L) file (``column``: the text
    or messages column; None: the usual fields of each row)."""
    path = Path(source)
    if column is None and path.suffix in (".jsonl", ".json") and path.is_file():
        from mtpspec.drafter.data import read_prompt_file

        return read_prompt_file(path)  # the JSONL reader that needs no datasets
    table = _open_prompt_table(path)
    if column is not None and column not in table.column_names:
        raise ValueError(f"{source}: no column {column!r} (it has {table.column_names})")
    texts = []
    for row in (table[column] if column is not None else table):
        text = _text_of(row) if column is None else _text_of_value(row, source, column)
        if text:
            texts.append(text)
    return texts


def _open_prompt_table(path: Path):
    datasets = _datasets()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return loaded
    kinds = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
    if path.suffix not in kinds:
        raise ValueError(f"{path}: a prompt source is a dataset folder or a "
                         f"{'/'.join(kinds)} file")
    return datasets.load_dataset(kinds[path.suffix], data_files=str(path), split="train")


def _text_of_value(value, source: str, column: str) -> str | None:
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, list):  # messages
        return _text_of({"messages": value})
    raise ValueError(f"{source}: column {column!r} holds {type(value).__name__}, "
                     f"neither text nor a list of messages")


# --- stored responses ----------------------------------------------------------------------------

class StoredSequences:
    """Training sequences read from an Arrow table (memory-mapped): ``[i]`` is a token list, or
    the ``TargetStates`` recorded for it; ``lengths`` without reading the rows."""

    def __init__(self, table):
        self.table = table
        self.states = "hidden" in table.column_names
        self.lengths = table.data.column("length").to_pylist()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int):
        row = self.table[int(index)]
        if not self.states:
            return row["ids"]
        tensors = {name: torch.frombuffer(bytearray(row[name]), dtype=dtype).view(
            row[name + "_shape"]) for name, dtype in _TENSORS.items()}
        return TargetStates(ids=row["ids"], known_from=row["known_from"],
                            layers=tuple(row.get("layers") or ()), **tensors)

    def token_lists(self) -> list[list[int]]:
        """Every sequence's ids (the ids column only)."""
        return self.table.data.column("ids").to_pylist()


def _rows(sequences: list) -> dict[str, list]:
    """Columns for token lists or ``TargetStates``."""
    columns: dict[str, list] = {"ids": [], "length": []}
    for seq in sequences:
        ids = list(seq.ids) if isinstance(seq, TargetStates) else list(seq)
        columns["ids"].append(ids)
        columns["length"].append(len(ids))
        if isinstance(seq, TargetStates):
            columns.setdefault("known_from", []).append(int(seq.known_from))
            columns.setdefault("layers", []).append(list(seq.layers))  # target layer of each K/V
            for name, dtype in _TENSORS.items():
                tensor = getattr(seq, name).to(dtype).contiguous()
                columns.setdefault(name, []).append(tensor.numpy().tobytes())
                columns.setdefault(name + "_shape", []).append(list(tensor.shape))
    return columns


def _write(sequences: list, folder: Path) -> None:
    """Write ``sequences`` as one dataset folder, whole or not at all."""
    datasets = _datasets()
    partial = folder.with_name(folder.name + ".partial")
    folder.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists():
        shutil.rmtree(partial)  # left by a killed run
    if sequences:
        datasets.Dataset.from_dict(_rows(sequences)).save_to_disk(str(partial))
    else:  # every response was dropped: done, nothing to read (datasets reads no empty folder)
        partial.mkdir()
        (partial / EMPTY).touch()
    os.replace(partial, folder)


def _read(folders: list[Path]) -> StoredSequences:
    datasets = _datasets()
    tables = [datasets.load_from_disk(str(folder)) for folder in folders
              if not (folder / EMPTY).exists()]
    if not tables:
        return StoredSequences(datasets.Dataset.from_dict({"ids": [], "length": []}))
    return StoredSequences(tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables))


class ResponseStore:
    """``WORK/dataset``: the held-out set, the training chunks and what wrote them."""

    def __init__(self, work: Path):
        self.root = Path(work) / FOLDER
        self.legacy = Path(work) / "data.pt"

    @property
    def meta(self) -> dict:
        path = self.root / "meta.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def write_meta(self, **fields) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, **self.meta, **fields}
        partial = self.root / "meta.json.partial"
        partial.write_text(json.dumps(meta, indent=1))
        os.replace(partial, self.root / "meta.json")

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def check_target(self, weights_hash: str) -> None:
        """Refuse responses another target wrote (a hash of "" was not recorded: accepted)."""
        wrote = self.meta.get("target_hash", "")
        if wrote and weights_hash and wrote != weights_hash:
            raise ValueError(f"{self.root} was generated by target weights {wrote[:12]}, not "
                             f"{weights_hash[:12]}: use another --work-dir or remove it")

    def start(self, weights_hash: str, plan: dict, write: bool = True) -> None:
        """Check that an unfinished store was started with the same plan (its batches are
        numbered by it), then record the plan (``write``: rank 0 only)."""
        plan = json.loads(json.dumps(plan))  # as it reads back from meta.json
        started = self.meta.get("plan")
        if started is not None and started != plan:
            changed = sorted(k for k in set(plan) | set(started) if plan.get(k) != started.get(k))
            raise ValueError(f"{self.root} holds an unfinished generation with other settings "
                             f"({', '.join(changed)}): run with those, or remove it")
        if write:
            self.write_meta(target_hash=weights_hash, complete=False, plan=plan)

    def chunk(self, n: int) -> Path:
        return self.root / "train" / f"chunk-{n:05d}"

    def migrate_legacy(self, log=print) -> bool:
        """Convert an old ``data.pt`` (if there is one and no dataset yet); True if done."""
        if self.root.exists() or not self.legacy.exists():
            return False
        # our own file from an earlier run of this recipe (token lists and TargetStates)
        data = torch.load(self.legacy, weights_only=False)
        (self.root / "train").mkdir(parents=True, exist_ok=True)
        _write(data["eval"], self.root / "eval")
        _write(data["train"], self.chunk(0))
        extra = {"eval_tasks": data["eval_tasks"]} if "eval_tasks" in data else {}
        self.write_meta(target_hash="", complete=True, migrated_from=str(self.legacy), **extra)
        log(f"converted {self.legacy} ({len(data['train'])} sequences) to {self.root}; "
            f"the old file is no longer read")
        return True

    def train(self) -> StoredSequences:
        return _read(sorted(p for p in (self.root / "train").glob("chunk-*")
                            if not p.name.endswith(".partial")))

    def eval(self) -> list[list[int]]:
        return _read([self.root / "eval"]).token_lists()


def generate_store(store: ResponseStore, target, prompts: list[list[int]], eval_prompts:
                   list[list[int]], settings: GenerationSettings, world, monitor, log=print) -> None:
    """Write every missing piece of ``store``: rank 0 the held-out greedy set, every rank its
    generation batches (batch n goes to rank n % world.size); then mark it complete."""
    if world.is_main and not (store.root / "eval").exists():
        responses = generate_batch(target, eval_prompts, settings.max_new_tokens, SamplingParams())
        _write([p + r for p, r in zip(eval_prompts, responses)], store.root / "eval")
    # similar lengths batch well; sorted within blocks of 8 batches, so that a time budget that
    # stops early still keeps long prompts (the mix's documents) in proportion
    block = 8 * settings.batch
    order = [i for first in range(0, len(prompts), block)
             for i in sorted(range(first, min(first + block, len(prompts))),
                             key=lambda i: len(prompts[i]))]
    starts = list(range(0, len(order), settings.batch))
    mine = [n for n in range(len(starts)) if n % world.size == world.rank]
    todo = [n for n in mine if not store.chunk(n).exists()]
    monitor.start_generation(sum(len(order[starts[n]:starts[n] + settings.batch]) for n in mine),
                             done=sum(len(order[starts[n]:starts[n] + settings.batch])
                                      for n in mine if n not in todo))
    started = time.time()
    for n in todo:
        if settings.max_seconds is not None and time.time() - started > settings.max_seconds:
            log(f"generation time budget reached; {todo.index(n)} of {len(todo)} batches written")
            break
        chunk = [prompts[i] for i in order[starts[n]:starts[n] + settings.batch]]
        sequences, new_tokens = generate_chunk(target, chunk, n, settings)
        _write(sequences, store.chunk(n))
        monitor.generated(len(chunk), new_tokens)
        log(f"generated batch {n + 1}/{len(starts)} ({len(chunk)} prompts, {len(sequences)} "
            f"kept), {time.time() - started:.0f}s")
    monitor.end_generation()
    distributed.barrier(world)
    if world.is_main:
        store.write_meta(complete=True)
    distributed.barrier(world)


@dataclass(frozen=True)
class GenerationSettings:
    """How the target answers the training prompts (see ``generate_chunk``)."""

    max_new_tokens: int
    batch: int                             # prompts per generation batch (= per stored chunk)
    sampled_fraction: float                # of batches sampled at T=0.8, top-p 0.95; the rest greedy
    seed: int
    max_seconds: float | None = None       # per rank: stop starting new batches after this
    layers: tuple[int, ...] | None = None  # record TargetStates with these layers' K/V
    top_k: int = 32                        # recorded next-token distribution size


def generate_chunk(target, chunk: list[list[int]], n: int,
                   settings: GenerationSettings) -> tuple[list, int]:
    """Generation batch ``n``: greedy or (``sampled_fraction`` of batches) sampled responses to
    ``chunk``, with a generator seeded by (seed, n); token lists, or with ``settings.layers`` the
    ``TargetStates`` recorded while the target wrote them. Responses under MIN_RESPONSE dropped.
    Returns (the sequences kept, the number of tokens the target wrote)."""
    sampled = random.Random(settings.seed + n).random() < settings.sampled_fraction
    params = SAMPLED if sampled else SamplingParams()
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + n)
    if settings.layers is None:
        responses = generate_batch(target, chunk, settings.max_new_tokens, params, generator)
        return ([p + r for p, r in zip(chunk, responses) if len(r) > MIN_RESPONSE],
                sum(map(len, responses)))
    states = generate_states(target, chunk, settings.max_new_tokens, params, generator,
                             settings.layers, settings.top_k)
    written = [len(st) - len(p) for st, p in zip(states, chunk)]
    return [st for st, w in zip(states, written) if w > MIN_RESPONSE], sum(written)
