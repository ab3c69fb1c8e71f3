"""Whether an arm can save between the stop signal and the kill (a warning, never an error).

At a time limit or a preemption a job gets SIGUSR2 `launcher.signal_delay_s` seconds before it is
killed (trainer/runtime/preempt.py). In that time it reaches its next log point, waits for a save
still being written in the background, and writes one more checkpoint whole before it is requeued.
`ablate run` projects those two writes for each arm from its checkpoint's size (`state_bytes`: its
model's real parameter count, the optimizer's moments, the EMA) at WRITE_BYTES_PER_S, and when they
do not fit says so in one line: the arm still runs, but a stop would lose the steps since its last
complete checkpoint. One process writes a whole checkpoint; in a sharded one (an FSDP arm on several
processes: trainer/runtime/sharded.py) each process writes its share at once, so the time divides by
the processes (a cluster file system takes one stream per client).
"""

from __future__ import annotations

import math

from ablate.running.launch import Launcher
from ablate.sweep.expand import RunSpec

WRITE_BYTES_PER_S = 0.5e9
"""The write speed assumed for one process writing a checkpoint to the run folder: conservative for a
shared cluster file system (one client streams about 1-2 GB/s to Lustre or GPFS, 0.5-1 GB/s to NFS over
10 GbE). `make bench` (bench/save_bench.py) measures this machine's own."""


def stop_save_warning(specs: list[RunSpec], launcher: Launcher) -> str | None:
    """One line naming the arm that needs the longest when some arms' stop-time saves do not fit, else None."""
    if "signal_delay_s" not in launcher.kind.fields:  # the executor sends no stop signal
        return None
    from trainer.runtime.async_save import state_bytes

    sizes: dict[str, object] = {}
    late = []
    world = launcher.nodes * launcher.tasks_per_node
    for spec in specs:
        cfg = spec.train
        key = "|".join(
            c.model_dump_json() for c in (cfg.model, cfg.tokenizer, cfg.text_encoder, cfg.precision)
        )
        key += f"|ema={cfg.ema is not None}"
        size = sizes[key] = sizes.get(key) or state_bytes(cfg)
        writers = world if cfg.parallel.shards_parameters and world > 1 else 1
        seconds = 2 * size.total / writers / WRITE_BYTES_PER_S  # a save in flight, then the stop's own
        if seconds > launcher.signal_delay_s:
            late.append((seconds, spec.name, size))
    if not late:
        return None
    seconds, name, size = max(late, key=lambda x: x[0])
    return (
        f"warning: arm {name} may need {seconds:.0f} s to save after a stop signal, more than "
        f"launcher.signal_delay_s {launcher.signal_delay_s}: its checkpoint ({size.total / 1e9:.1f} GB, "
        f"{size.parameters / 1e9:.2f} B parameters) written twice (a save in flight, then the stop's) at "
        f"an assumed {WRITE_BYTES_PER_S / 1e9:g} GB/s ({len(late)} of {len(specs)} arms); a stop would lose "
        f"the steps since the last checkpoint: raise signal_delay_s to {60 * math.ceil(seconds / 60)}"
    )
