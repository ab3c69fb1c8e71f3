"""One process of the resharding test (test_dcp.py): the trainer of a run folder resumes from its newest
checkpoint at this world size, then gathers what it holds whole (weights, each optimizer's state keyed
by parameter name, EMA shadows) for the test to compare with what the checkpoint saved."""

from __future__ import annotations

import os


def run(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from trainer.config import load
    from trainer.runtime import dist as distributed
    from trainer.train import Trainer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    cfg = load(os.path.join(run_dir, "config.yaml"))
    d = distributed.init(cfg.train.collective_timeout_s, cfg.train.collective_timeout_long_s)
    try:
        tr = Trainer(cfg, run_dir, d)
        tr.resume()
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        held = {
            "step": tr.step,
            "layout": type(tr.parallel).__name__,
            "weights": tr.parallel.weights(),
            "optimizer": {
                name: get_optimizer_state_dict(tr.denoiser, opt, options=whole).get("state")  # main: whole
                for name, opt in tr.optimizer.optimizers.items()
            },
            "ema": tr.parallel.ema_state(tr.ema),
        }
        if d.main:
            torch.save(held, out)
    finally:
        distributed.shutdown()
