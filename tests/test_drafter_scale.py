"""Tests for training drafters at scale on a tiny Gemma 3 target: two data-parallel ranks under
torchrun (gloo) equal one process, a run killed during generation and again during training
resumes to the very drafter an uninterrupted run writes, prompts from Hugging Face datasets
(Parquet, JSONL, a saved dataset folder; text and messages columns), responses stored as a
dataset (and an old ``data.pt`` converted), TensorBoard scalars.

Every run here takes seconds: a 4-layer target of width 64, a handful of prompts, a few steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtpspec.drafter import dataset as dataset_module
from mtpspec.drafter import recipe
from mtpspec.drafter import train as train_module
from mtpspec.drafter.data import TargetStates, build_prompts

from tiny_hf import write_tiny_hf_model

pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]
# 10 training prompts in batches of 3 (4 chunks: the 2 ranks get 2 each), a global batch of 4
TRAIN_ARGS = ["--num-prompts", "10", "--eval-prompts", "2", "--max-new-tokens", "14",
              "--gen-batch", "3", "--steps", "4", "--batch-size", "4", "--seq-len", "24",
              "--unroll", "2", "--d-draft", "32", "--layers", "2", "--heads", "4",
              "--intermediate", "64", "--clusters", "8", "--top-clusters", "2",
              "--eval-every", "2", "--lr", "1e-2", "--quiet"]


class Killed(Exception):
    """Stands for the process dying at that point."""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_hf_model(tmp_path_factory.mktemp("target") / "tiny", chat_template=True)


@pytest.fixture(scope="module")
def prompt_ids(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(3, 500, (int(n),), generator=gen).tolist()
               for n in torch.randint(2, 7, (12,), generator=gen)]
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps(prompts))
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MTPSPEC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run_recipe(model: Path, prompt_ids: Path, out: Path, *extra: str) -> dict:
    parser = recipe.argparse.ArgumentParser()
    recipe.add_arguments(parser)
    args = parser.parse_args(["--model", str(model), "--out", str(out), "--prompt-ids",
                              str(prompt_ids), *TRAIN_ARGS, *extra])
    return recipe.run(args, log=lambda _line: None)


def head_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "train_state.pt", weights_only=False)["head"]


@pytest.fixture(scope="module")
def straight(model, prompt_ids, tmp_path_factory) -> Path:
    """One process, never interrupted: the reference drafter."""
    out = tmp_path_factory.mktemp("straight") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTPSPEC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        run_recipe(model, prompt_ids, out, "--tensorboard", str(out / "tb"))
    return out


# --- data parallel ---------------------------------------------------------------------------------

def test_two_torchrun_ranks_train_the_single_process_drafter(model, prompt_ids, straight,
                                                            tmp_path):
    """``mtpspec train --nproc 2``: torchrun, gloo, 2 CPU ranks sharing generation batches and
    every global batch of 4; the same data and, up to float sums, the same drafter."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "MTPSPEC_CACHE": os.environ["MTPSPEC_CACHE"]}
    command = [sys.executable, "-c", "import sys; from mtpspec.cli import main; sys.exit(main())",
               "train", "--nproc", "2", "--model", str(model), "--out", str(out), "--prompt-ids",
               str(prompt_ids), *TRAIN_ARGS]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = dataset_module.ResponseStore(out)
    theirs = dataset_module.ResponseStore(straight)
    assert sorted(p.name for p in (ours.root / "train").iterdir()) == \
        [f"chunk-{n:05d}" for n in range(4)]
    assert ours.train().token_lists() == theirs.train().token_lists()
    assert ours.eval() == theirs.eval()
    # the loss is the global batch's (each rank's slice over the global count, summed): a rank
    # that trained on the whole batch, or normalised by its own count, would double it
    losses = [[entry["loss"] for entry in torch.load(folder / "train_state.pt",
                                                     weights_only=False)["history"]]
              for folder in (straight, out)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    one, two = head_state(straight), head_state(out)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    assert json.loads((out / "eval.json").read_text()).keys() == {"clustered", "frequency", "full"}


class ReadLog(list):
    """Training sequences that note which of them the trainer reads."""

    def __init__(self, items):
        super().__init__(items)
        self.lengths, self.read = [len(x) for x in items], []

    def __getitem__(self, index):
        self.read.append(index)
        return super().__getitem__(index)


def test_a_rank_reads_only_its_slice_of_each_global_batch(tmp_path, monkeypatch):
    """Rank 1 of 2 (collectives stubbed to one process) reads the second half of every global
    batch; the two-rank test above proves the summed result."""
    from conftest import tiny_model

    from mtpspec.drafter import distributed
    from mtpspec.drafter.distributed import World
    from mtpspec.drafter.head import DrafterConfig, MTPHead, init_weights

    dense = tiny_model(fmt="dense")
    for name in ("sum_gradients", "barrier"):
        monkeypatch.setattr(distributed, name, lambda *args: None)
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda value, *args: value)
    monkeypatch.setattr(distributed, "from_main", lambda value, *args: value)
    gen = torch.Generator().manual_seed(0)
    sequences = ReadLog([[2] + torch.randint(3, 500, (12,), generator=gen).tolist()
                         for _ in range(8)])
    head = MTPHead(DrafterConfig.for_target(dense.config, d_draft=32, intermediate_size=64,
                                            num_clusters=8, frequency_vocab=64))
    init_weights(head)
    config = train_module.TrainConfig(steps=2, batch_size=4, seq_len=16, unroll=1, top_k=4,
                                      warmup=1, save_every=100, eval_every=100)
    train_module.train(head, dense, sequences, config, tmp_path, log=lambda _line: None,
                       world=World(rank=1, size=2))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    assert sequences.read == [0] + perm[2:4] + perm[6:8]  # [0]: the trainer's look at their kind


def test_a_global_batch_must_split_evenly():
    from mtpspec.drafter.distributed import World, rank_slice

    assert rank_slice(list(range(8)), World(rank=1, size=2)) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        rank_slice(list(range(8)), World(rank=0, size=3))


# --- resuming --------------------------------------------------------------------------------------

def test_a_killed_run_resumes_to_the_uninterrupted_drafter(model, prompt_ids, straight, tmp_path,
                                                           monkeypatch):
    """Killed after writing 2 of 4 generation batches, then killed again right after the step-2
    checkpoint; the third start finishes: the drafter equals the one-go run's bit for bit."""
    out = tmp_path / "out"
    write, writes = dataset_module._write, []

    def write_then_die(sequences, folder):
        write(sequences, folder)
        writes.append(folder.name)
        if len(writes) == 3:  # the held-out set, then two training chunks
            raise Killed

    monkeypatch.setattr(dataset_module, "_write", write_then_die)
    with pytest.raises(Killed):
        run_recipe(model, prompt_ids, out)
    monkeypatch.undo()
    assert writes == ["eval", "chunk-00000", "chunk-00001"]
    save = train_module._save

    def save_then_die(*args):
        save(*args)
        raise Killed

    monkeypatch.setattr(train_module, "_save", save_then_die)
    generated = []
    monkeypatch.setattr(dataset_module, "generate_chunk", _recording(generated))
    with pytest.raises(Killed):
        run_recipe(model, prompt_ids, out)
    assert generated == [2, 3]  # only the batches the first start had not written
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 2
    monkeypatch.undo()
    result = run_recipe(model, prompt_ids, out)
    assert result["steps"] == 4
    resumed, reference = head_state(out), head_state(straight)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    assert (out / "drafter.safetensors").read_bytes() == \
        (straight / "drafter.safetensors").read_bytes()
    assert json.loads((out / "eval.json").read_text()) == \
        json.loads((straight / "eval.json").read_text())


def test_an_unfinished_generation_resumes_only_with_its_settings(model, prompt_ids, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(dataset_module, "generate_chunk", _dies_at(1))
    with pytest.raises(Killed):
        run_recipe(model, prompt_ids, out)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unfinished generation with other settings "
                                         r"\(batch, max_new_tokens\)"):
        run_recipe(model, prompt_ids, out, "--gen-batch", "4", "--max-new-tokens", "9")


def _dies_at(batch: int):
    inner = dataset_module.generate_chunk

    def generate_chunk(target, chunk, n, settings):
        if n == batch:
            raise Killed
        return inner(target, chunk, n, settings)

    return generate_chunk


def _recording(calls: list):
    inner = dataset_module.generate_chunk

    def generate_chunk(target, chunk, n, settings):
        calls.append(n)
        return inner(target, chunk, n, settings)

    return generate_chunk


def test_recorded_states_are_stored_and_trained_from(model, prompt_ids, tmp_path):
    """``--gen-weights``: the packed target's states go into the data set as rows of fp16 bytes
    and training reads them back from it."""
    out = tmp_path / "out"
    result = run_recipe(model, prompt_ids, out, "--gen-weights", "fp32", "--steps", "2")
    stored = dataset_module.ResponseStore(out).train()
    assert stored.states and len(stored) > 4 and result["steps"] == 2
    first = stored[0]
    assert isinstance(first, TargetStates) and first.hidden.dtype == torch.float16
    assert first.hidden.shape == (len(first.ids), 64) and first.keys.shape[2] == len(first.ids)


def test_a_checkpoint_is_replaced_whole(tmp_path, monkeypatch):
    """A kill while ``train_state.pt`` is written leaves the previous one readable."""
    from mtpspec.drafter.head import DrafterConfig, MTPHead
    from mtpspec.config import tiny_config

    state = tmp_path / "train_state.pt"
    state.write_bytes(b"previous")
    head = MTPHead(DrafterConfig.for_target(tiny_config(), d_draft=32, intermediate_size=64,
                                            num_clusters=8, frequency_vocab=64))

    def torch_save_dies(obj, path):
        Path(path).write_bytes(b"half a")
        raise Killed

    monkeypatch.setattr(train_module, "save_drafter", lambda *a, **k: None)
    monkeypatch.setattr(train_module, "target_fingerprint", lambda _t: "same")
    monkeypatch.setattr(train_module.torch, "save", torch_save_dies)
    with pytest.raises(Killed):
        train_module._save(head, torch.optim.AdamW(head.parameters()), None, "same",
                           train_module.TrainConfig(), [], tmp_path, 2, None, state)
    assert state.read_bytes() == b"previous"


# --- datasets --------------------------------------------------------------------------------------

def test_prompts_from_parquet_jsonl_and_dataset_folders(model, tmp_path):
    """Text and messages columns, through the target's chat template."""
    import datasets

    from mtpspec.tokenizer import load_tokenizer_hf

    messages = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                 {"role": "assistant", "content": "hello"}],
                [{"role": "user", "content": "what is 2+2"}]]
    table = datasets.Dataset.from_dict({"messages": messages, "text": ["alpha", "beta"]})
    table.to_parquet(str(tmp_path / "p.parquet"))
    table.to_json(str(tmp_path / "p.jsonl"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "folder"))
    read = dataset_module.read_prompts
    for source in ("p.parquet", "p.jsonl", "folder"):
        assert read(str(tmp_path / source), "messages") == ["hi there", "what is 2+2"], source
        assert read(str(tmp_path / source), "text") == ["alpha", "beta"], source
    assert read(str(tmp_path / "folder")) == ["hi there", "what is 2+2"]  # the known fields
    with pytest.raises(ValueError, match=r"no column 'prompt' \(it has \['messages', 'text'\]\)"):
        read(str(tmp_path / "p.parquet"), "prompt")
    tokenizer = load_tokenizer_hf(model)
    ids = build_prompts(tokenizer, [str(tmp_path / "p.parquet")], 10, 200, column="messages")
    chat = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is 2+2"}]), add_bos=False)
    assert chat in ids and len(ids) == 2
    assert "<start_of_turn>" in tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_an_old_data_pt_is_converted_and_read_back(tmp_path):
    states = [TargetStates(ids=[2, 5, 6, 7], known_from=1,
                           hidden=torch.randn(4, 8).half(), keys=torch.randn(2, 1, 4, 16).half(),
                           values=torch.randn(2, 1, 4, 16).half(),
                           probs=torch.rand(4, 3).half(), tops=torch.randint(0, 9, (4, 3)).int())]
    torch.save({"train": states, "eval": [[2, 3, 4]]}, tmp_path / "data.pt")
    store = dataset_module.ResponseStore(tmp_path)
    assert store.migrate_legacy(log=lambda _line: None) and store.complete
    assert not store.migrate_legacy(log=lambda _line: None)  # once
    back = store.train()
    assert len(back) == 1 and back.lengths == [4] and back.token_lists() == [[2, 5, 6, 7]]
    got = back[0]
    assert got.ids == states[0].ids and got.known_from == 1
    for name in ("hidden", "keys", "values", "probs", "tops"):
        assert torch.equal(getattr(got, name), getattr(states[0], name)), name
    assert store.eval() == [[2, 3, 4]]
    store.write_meta(target_hash="a" * 64)
    with pytest.raises(ValueError, match="generated by target weights aaaaaaaaaaaa"):
        store.check_target("b" * 64)


def test_a_batch_that_kept_nothing_counts_as_written(tmp_path):
    store = dataset_module.ResponseStore(tmp_path)
    for n, sequences in enumerate([[], [[2, 3, 4]], [], [[2, 5]]]):
        dataset_module._write(sequences, store.chunk(n))
    assert all(store.chunk(n).exists() for n in range(4))  # not generated again on resume
    back = store.train()
    assert back.token_lists() == [[2, 3, 4], [2, 5]] and back[1] == [2, 5]


# --- progress and logs -----------------------------------------------------------------------------

def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_the_recipe_writes_tensorboard_scalars(straight):
    """``--tensorboard``: the loss every step, held-out acceptance at every evaluation."""
    pytest.importorskip("tensorboard")
    found = scalars(straight / "tb")
    assert [step for step, _ in found["train/loss"]] == [1, 2, 3, 4]
    history = torch.load(straight / "train_state.pt", weights_only=False)["history"]
    assert [step for step, _ in found["eval/tau_at_6"]] == [2, 4]
    assert [value for _, value in found["eval/accept_pos_1"]] == pytest.approx(
        [entry["acceptance_per_position"][0] for entry in history])


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtpspec.drafter.monitor import Monitor

    monitor = Monitor(tensorboard=tmp_path / "tb")
    assert not monitor.bars  # stderr is not a terminal under pytest
    monitor.start_training(0, 2)
    monitor.training_step(1, 3.5, 0.1, 1e-3, 100)
    monitor.training_step(2, 3.0, 0.2, 1e-3, 100)
    monitor.evaluation(2, {"tau": {1: 1.4, 2: 1.6}, "acceptance_per_position": [0.4, 0.5]})
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/tau_at_2", "eval/accept_pos_1"} <= tags
    assert [e.value for e in events.Scalars("train/loss")] == [3.5, 3.0]
