"""Save before the job stops: a scheduler's stop signal is deferred to a step boundary.

Two signals stop a job under submitit:
- SIGUSR2 (submitit's `--signal=USR2@signal_delay_s`) arrives before the time limit or on a
  preemption; submitit's own handler would checkpoint the job *callable* and requeue at once,
  losing the steps since the last periodic checkpoint.
- SIGTERM is how the scheduler itself stops the job: `scontrol requeue`, `scancel`, a preemption
  without a user signal, a node being drained. submitit ignores it in the job; SIGKILL follows
  after the cluster's KillWait (30 s by default).

Here either signal only sets a flag. At the next log point every process agrees on it (one
all-reduce), the trainer writes a checkpoint and records the requeue in status.json, and then:
after SIGUSR2, rank 0 runs submitit's handler, which requeues the job (or, after
`launcher.max_requeues` time-outs, ends it as failed); after SIGTERM the job just exits, since the
scheduler already decided what comes next. A requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.runtime.dist import Dist

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preemption:
    def __init__(self):
        self.caught: tuple | None = None
        self.previous: dict[int, object] = {}
        self.installed = (
            bool(os.environ.get("SUBMITIT_EXECUTOR"))
            and threading.current_thread() is threading.main_thread()
        )
        if self.installed:
            self.previous = {s: signal.signal(s, self._catch) for s in SIGNALS}

    def _catch(self, signum, frame) -> None:
        if self.caught is None or signum == signal.SIGUSR2:  # USR2 (requeue through submitit) wins over TERM
            self.caught = (signum, frame)

    @property
    def reason(self) -> str:
        """What stopped the job, for the run's records."""
        if self.caught is None:
            return ""
        return (
            "time limit or preemption (SIGUSR2)"
            if self.caught[0] == signal.SIGUSR2
            else "stopped by the scheduler (SIGTERM)"
        )

    def pending(self, dist: Dist) -> bool:
        """True on every process as soon as any of them caught a signal (a collective call)."""
        if not self.installed:
            return False
        import torch  # not at import: the job installs this before the heavy imports

        flag = torch.tensor(float(self.caught is not None), device=dist.device)
        return bool(dist.all_sum(flag).item() > 0)

    def hand_over(self, dist: Dist) -> None:
        """After the checkpoint: on SIGUSR2 rank 0 runs submitit's handler (requeue, then exit); otherwise exit."""
        caught = self.caught
        usr2 = self.previous.get(signal.SIGUSR2)
        self.restore()
        if dist.main and caught is not None and caught[0] == signal.SIGUSR2 and callable(usr2):
            usr2(*caught)
        raise SystemExit(0)

    def restore(self) -> None:
        if self.installed:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            self.installed = False
