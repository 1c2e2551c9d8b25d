"""Data-parallel drafter training: the process group, the shard of work each rank takes, and the
gradient sum that keeps every rank's head identical.

Launched by ``torchrun --nproc-per-node N -m mtpspec.drafter.recipe ...`` (or ``mtpspec train
--nproc N``, which runs that command), each rank holds a full copy of the frozen target and of the
head. Response generation is sharded by generation batch; each training step's global batch of
``batch_size`` sequences is split into ``world`` equal slices. Every rank sums its slice's loss
over the *global* count of scored positions, and the gradients are summed over ranks (one
all-reduce of a flat buffer per step): the update is the single-process update on the whole
batch, up to the order of float additions. Every rank then takes the same optimizer step, so the
heads never drift apart and only rank 0 writes checkpoints.

Why not ``DistributedDataParallel``: its reducer hooks into ``module.forward``, while training
applies the head step by step (``MTPHead.step_states``) and scores its centroids and own
embedding outside any forward; for a head of ~10M parameters one flat all-reduce after backward
costs the same as DDP's bucketed one and keeps the training step one code path for 1 or N ranks.
The target is never wrapped or sharded here (see the README for FSDP when it does not fit one
device). Single process (no ``WORLD_SIZE`` in the environment): every function here is a no-op.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# generous: ranks wait for each other while rank 0 writes the held-out set or evaluates, and
# generation shards of unequal lengths finish apart
TIMEOUT = timedelta(hours=3)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Whether torchrun (or another launcher setting ``WORLD_SIZE``) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> tuple[World, str]:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA);
    returns (this rank's World, its device: ``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    if not launched():
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                  int(os.environ.get("LOCAL_RANK", "0")))
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=TIMEOUT)
    return world, device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def rank_slice(items: list, world: World) -> list:
    """This rank's equal, contiguous part of a global batch (its size must divide evenly)."""
    if len(items) % world.size:
        raise ValueError(f"a global batch of {len(items)} does not split over {world.size} ranks")
    part = len(items) // world.size
    return items[world.rank * part:(world.rank + 1) * part]


def sum_over_ranks(value: float | int, world: World, device) -> float:
    """The sum of a number over all ranks (the number itself in one process)."""
    if not world.active:
        return value
    total = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total)


def sum_gradients(module: torch.nn.Module, world: World) -> None:
    """Sum every parameter's gradient over the ranks, in place (one flat all-reduce). Every rank
    runs the same graph, so the same parameters hold a gradient on each; the others keep none."""
    if not world.active:
        return
    params = [p for p in module.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # [sum of numels]
    dist.all_reduce(flat)
    offset = 0
    for param in params:
        n = param.grad.numel()
        param.grad.copy_(flat[offset:offset + n].view_as(param.grad))
        offset += n


def relaunch(argv: list[str], nproc: int) -> int:
    """Run ``argv`` (recipe arguments, without ``--nproc``) as ``nproc`` ranks under torchrun on
    this machine; returns its exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "mtpspec.drafter.recipe", *argv]
    return subprocess.call(command)


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` less ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == name:
            skip = True
        elif not item.startswith(name + "="):
            out.append(item)
    return out


def from_main(value: float, world: World, device) -> float:
    """Rank 0's value of a number on every rank (e.g. elapsed time: ranks must agree on it)."""
    if not world.active:
        return value
    held = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.broadcast(held, 0)
    return float(held)
