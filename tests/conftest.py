"""Shared fixtures: tiny random Gemma 3 models, and the real default model when it is installed."""
from __future__ import annotations

import pytest
import torch

from mtpspec.config import tiny_config
from mtpspec.models.decoder import DecoderModel, random_weights

# tiny models run ~20x faster on one thread when another process shares the two cores;
# real-model tests that time nothing are fine with it too (the parity test sets its own)
torch.set_num_threads(1)


def tiny_model(seed: int = 0, fmt: str = "fp32", **overrides) -> DecoderModel:
    config = tiny_config(**overrides)
    return DecoderModel(config, random_weights(config, seed=seed), fmt)


@pytest.fixture(scope="session")
def tiny():
    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_drafter_model():
    # a different random model with the same vocabulary: a weak but real draft model
    return tiny_model(seed=1, num_layers=2)


@pytest.fixture(scope="session")
def real_target():
    """The embedded default model (loads from the cache after the first run)."""
    from mtpspec.runtime import load_target

    try:
        return load_target(None, "fp32")
    except Exception as err:  # noqa: BLE001 - any failure to load means: skip the real-model tests
        pytest.skip(f"default model unavailable: {err}")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run a test with the native kernels on 1, then 2 threads (restored afterwards)."""
    from mtpspec import ops

    before = ops.get_num_threads()
    ops.set_num_threads(request.param)
    yield request.param
    ops.set_num_threads(before)
