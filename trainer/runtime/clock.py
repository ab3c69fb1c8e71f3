"""When the loop's components act, and where an arm's wall time goes.

- `Cadence`: every N steps and at the last one (logging, evaluation and checkpoints each own one).
- `Window`: the steps since the last log line: their losses (kept on the device, no sync) and their
  wall time, split into waiting for data and the rest.
- `Clock`: the arm's time per phase (set-up, training, evaluation, checkpoints) and its steady-state
  speed (the first steps' warm-up left out), kept in checkpoints so a resumed arm keeps counting.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from core.records import LogRow, Throughput
from core.rundir import now


@dataclass(frozen=True)
class Cadence:
    """Due every `every` steps, and at the `last` step."""

    every: int
    last: int

    def __call__(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last


class Window:
    def __init__(self, device: torch.device):
        self.device = device
        self.tick = time.perf_counter()
        self.clear()

    def clear(self) -> None:
        self.data = self.total = 0.0
        self.steps, self.losses = 0, []

    def batches(self, loader: Iterable) -> Iterator:
        """The loader's batches, noting when each arrived (the wait for it is data time)."""
        for batch in loader:
            self.got = time.perf_counter()
            yield batch

    def stepped(self, loss: torch.Tensor) -> None:
        done = time.perf_counter()
        self.data, self.total = self.data + self.got - self.tick, self.total + done - self.tick
        self.steps, self.tick = self.steps + 1, done
        self.losses.append(loss)

    def sync(self) -> None:
        """On a GPU the steps are asynchronous: wait for them, so the window's time is theirs."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.total += time.perf_counter() - self.tick
            self.tick = time.perf_counter()

    def resume(self) -> None:
        """After evaluation or a save: their time is not the steps'."""
        self.tick = time.perf_counter()


PHASES = ("setup_s", "train_s", "eval_s", "checkpoint_s")
MAX_WINDOWS = 256  # log windows a result keeps for the speed's interval


class Clock:
    def __init__(self, batch_size: int, total_steps: int, world: int):
        self.batch_size, self.total_steps, self.world = batch_size, total_steps, world
        self.times = dict.fromkeys(PHASES, 0.0)
        self.acc = [0.0, 0.0, 0]  # data s, total s, steps: after warm-up, for the steady-state speed
        self.windows: list[float] = []  # seconds per step of each log window after warm-up

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] += time.perf_counter() - t0

    def row(self, step: int, loss: float, grad_norm: float, lr: float, window: Window) -> LogRow:
        """The log line of the window that ends at `step`; its time counts as training time."""
        per_step = window.total / window.steps
        self.times["train_s"] += window.total
        if step > min(10, self.total_steps // 5):  # the first steps' warm-up stays out of the speed
            self.acc = [self.acc[0] + window.data, self.acc[1] + window.total, self.acc[2] + window.steps]
            self.windows.append(per_step)
        return LogRow(
            step=step,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            batches_per_s=1 / per_step,
            samples_per_s=self.batch_size / per_step,
            data_s=window.data / window.steps,
            compute_s=(window.total - window.data) / window.steps,
            eta_s=per_step * (self.total_steps - step),
            time=now(),
        )

    def throughput(self) -> Throughput:
        data, total, steps = self.acc
        if steps == 0:
            return Throughput()
        step_s, w = total / steps, np.array(self.windows or [total / steps])
        third = max(1, len(w) // 3)
        kept = w[np.linspace(0, len(w) - 1, min(len(w), MAX_WINDOWS)).round().astype(int)]
        return Throughput(
            batches_per_s=1 / step_s,
            samples_per_s=self.batch_size / step_s,
            step_s=step_s,
            data_s=data / steps,
            compute_s=(total - data) / steps,
            steps_measured=steps,
            world_size=self.world,
            step_s_median=float(np.median(w)),
            windows=[float(x) for x in kept],
            drift=float(np.median(w[-third:]) / np.median(w[:third])),
        )

    def state_dict(self) -> dict:
        return {
            "times": dict(self.times),
            "throughput": {"_acc": list(self.acc), "windows": list(self.windows)},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue counting from a checkpoint; this start's own set-up time is added to the saved one."""
        setup = self.times["setup_s"]
        self.times = {
            k: v + (setup if k == "setup_s" else 0.0) for k, v in state.get("times", self.times).items()
        }
        self.acc = list(state.get("throughput", {}).get("_acc", self.acc))
        self.windows = list(state.get("throughput", {}).get("windows", self.windows))
