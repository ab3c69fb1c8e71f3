"""Stand-in job callables for the launcher-mechanics tests (where the trainer is not under test).

Pickled by value (cloudpickle.register_pickle_by_value) so local-executor subprocesses,
which cannot import the tests folder, can run them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class RecordTimes:
    """Lasts `seconds`, then writes when it started and ended into the run directory."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds

    def __call__(self, run_dir: str) -> str:
        start = time.time()
        time.sleep(self.seconds)  # a job that lasts long enough for overlapping jobs to be seen
        (Path(run_dir) / "ran.json").write_text(json.dumps({"start": start, "end": time.time()}))
        return run_dir


class Fails:
    """Raises, counting its calls in the run directory."""

    def __call__(self, run_dir: str) -> None:
        counter = Path(run_dir) / "calls"
        counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
        raise RuntimeError("stand-in failure")
