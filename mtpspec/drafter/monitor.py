"""What a training run shows people while it works: progress bars and TensorBoard scalars.

Two tqdm bars, one for generation (prompts answered, generated tokens/s, ETA) and one for
training (steps, trained tokens/s, ETA), drawn on stderr only when it is a terminal, never with
``--quiet`` and only on rank 0; log lines pass above a live bar (``tqdm.write``). With
``--tensorboard DIR`` (and the ``tensorboard`` package installed: ``pip install tensorboard``),
rank 0 writes ``train/loss``, ``train/accept_at_1``, ``train/lr``, ``train/tokens_per_s`` per step
and ``eval/tau_at_k``, ``eval/accept_pos_i`` per held-out evaluation; a resumed run drops what
the previous one logged after its last checkpoint (``purge_step``). The numbers come from the
trainer; nothing here computes or changes them.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


class Monitor:
    """Progress bars and TensorBoard scalars for one rank (silent on ranks other than 0)."""

    def __init__(self, bars: bool = True, tensorboard: Path | None = None, main: bool = True,
                 log=print):
        self.bars = bars and main and sys.stderr.isatty()
        self.tensorboard, self.main, self._log = tensorboard if main else None, main, log
        self._bar = self._writer = None
        self._last = None  # (time, step) for the tokens/s of TensorBoard

    # --- log lines ---------------------------------------------------------------------------

    def log(self, line: str) -> None:
        """A log line (rank 0 only), above the live bar when there is one."""
        if not self.main:
            return
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            self._log(line)

    # --- generation --------------------------------------------------------------------------

    def start_generation(self, prompts: int, done: int = 0) -> None:
        self._open(prompts, done, "generate", "prompt")

    def generated(self, prompts: int, tokens: int) -> None:
        """``prompts`` more answered, with ``tokens`` new tokens among them."""
        if self._bar is not None:
            self._tokens += tokens
            self._bar.update(prompts)
            self._bar.set_postfix_str(f"{self._tokens / self._elapsed():.0f} tok/s")

    def end_generation(self) -> None:
        self._close()

    # --- training ----------------------------------------------------------------------------

    def start_training(self, step: int, steps: int) -> None:
        self._open(steps, step, "train", "step")
        if self.tensorboard is not None and self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.log("--tensorboard: the tensorboard package is not installed "
                         "(pip install tensorboard); no scalars written")
                self.tensorboard = None
            else:
                self._writer = SummaryWriter(str(self.tensorboard), purge_step=step or None)
        self._last = (time.time(), step)

    def training_step(self, step: int, loss: float, accept: float, lr: float,
                      tokens: int) -> None:
        """One optimizer step done: its global-batch loss, running position-1 agreement, learning
        rate and the tokens of the global batch."""
        now = time.time()
        rate = tokens / max(1e-9, now - self._last[0])
        self._last = (now, step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"loss {loss:.3f} {rate:.0f} tok/s")
        if self._writer is not None:
            for name, value in (("loss", loss), ("accept_at_1", accept), ("lr", lr),
                                ("tokens_per_s", rate)):
                self._writer.add_scalar(f"train/{name}", value, step)

    def evaluation(self, step: int, result: dict) -> None:
        """A held-out evaluation (``train.evaluate``'s result) at ``step``."""
        if self._writer is None:
            return
        for k, tau in result["tau"].items():
            self._writer.add_scalar(f"eval/tau_at_{k}", tau, step)
        for i, rate in enumerate(result["acceptance_per_position"]):
            self._writer.add_scalar(f"eval/accept_pos_{i + 1}", rate, step)
        self._writer.flush()

    def end_training(self) -> None:
        self._close()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        self._close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- the bar -----------------------------------------------------------------------------

    def _open(self, total: int, initial: int, desc: str, unit: str) -> None:
        self._close()
        self._started, self._tokens = time.time(), 0
        if self.bars:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                             dynamic_ncols=True)

    def _elapsed(self) -> float:
        return max(1e-9, time.time() - self._started)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
