"""Save before a requeue: submitit's "time is almost up" signal is deferred to a step boundary.

Under submitit, SIGUSR2 arrives `signal_delay_s` (90 s) before the time limit or on
preemption; submitit's own handler would checkpoint the job *callable* and requeue at once,
losing the steps since the last periodic checkpoint. Here the signal only sets a flag; at the
next log point all processes agree on it (one all-reduce), the trainer writes a checkpoint,
and then the original handler runs on rank 0 and requeues the job, which resumes from it.
"""

from __future__ import annotations

import os
import signal
import threading

import torch

from .dist import Dist


class Preemption:
    def __init__(self):
        self.caught: tuple | None = None
        self.previous = None
        self.installed = (
            bool(os.environ.get("SUBMITIT_EXECUTOR"))
            and threading.current_thread() is threading.main_thread()
        )
        if self.installed:
            self.previous = signal.signal(signal.SIGUSR2, self._catch)

    def _catch(self, signum, frame) -> None:
        self.caught = (signum, frame)

    def pending(self, dist: Dist) -> bool:
        """True on every process as soon as any of them caught the signal (a collective call)."""
        if not self.installed:
            return False
        flag = torch.tensor(float(self.caught is not None), device=dist.device)
        return bool(dist.all_sum(flag).item() > 0)

    def hand_over(self, dist: Dist) -> None:
        """After the checkpoint: rank 0 runs submitit's handler (requeue, then exit); the others exit."""
        self.restore()
        if dist.main and callable(self.previous):
            self.previous(*(self.caught or (signal.SIGUSR2, None)))
        raise SystemExit(0)

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGUSR2, self.previous)
            self.installed = False
