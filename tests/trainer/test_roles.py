"""The roles trainer/identity.py declares hold in the trainer: settings marked `runs` or `evaluates` leave
what an arm trains bitwise as it was (evaluation draws from its own generators, never the training's;
checkpoints, logging and loader workers read nothing the step computes from)."""

import torch
from safetensors.torch import load_file

from trainer import job
from trainer.config import TrainConfig
from trainer.identity import TRAINS, table
from trainer.runtime import checkpoint

NOT_TRAINED = {
    "eval": {"every": 2, "batch_size": 3, "sample_steps": 2, "resamples": 0},
    "checkpoint": {"every": 3, "keep": 1},
    "log": {"every": 1},
    "train": {"num_workers": 2, "threads": 2},
}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(checkpoint.latest(run_dir) / "transformer" / "diffusion_pytorch_model.safetensors")


def test_settings_that_do_not_train_leave_the_trained_weights_bitwise_equal(make_run):
    rows = table(TrainConfig)
    assert not [
        f"{s}.{k}" for s, keys in NOT_TRAINED.items() for k in keys if rows[f"{s}.{k}"]["role"] == TRAINS
    ]
    plain, other = make_run("plain"), make_run("other", **NOT_TRAINED)
    job.run(plain)
    job.run(other)
    a, b = final_weights(plain), final_weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (other / "eval").glob("step_*.json")) != sorted(
        p.name for p in (plain / "eval").glob("step_*.json")
    )  # it did evaluate on another cadence
