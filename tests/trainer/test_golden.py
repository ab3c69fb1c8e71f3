"""Golden losses: the tiny baseline (and one arm with every optional factor on) log exactly these numbers.

Refactors that are not meant to change the numerics must keep them bit-identical. The values were
recorded on CPU (torch 2.14.1, one thread, AVX2 kernels); on a CPU whose kernels differ (another
`torch.backends.cpu.get_cpu_capability()` or torch version) the last bits of a float may differ,
so there the comparison allows a relative 1e-5 — still far below any change a refactor causes.
If a change is *meant* to alter the numerics, update the values in the same commit and say why.
"""

import json

import pytest
import torch
import yaml
from trainer_testing import final_metrics, merge

from trainer import job

RECORDED_ON = ("2.14.1", "AVX2")
SHORT = {"train": {"steps": 6}, "log": {"every": 1}, "eval": {"every": 6}, "checkpoint": {"every": 6}}
EVERY_FACTOR = {
    "optimizer": {"kind": "muon", "lr": 1e-3, "adam_lr": 1e-3},
    "ema": {"kind": "ema", "decay": 0.9},
    "contrastive": {"kind": "contrastive", "group": 4},  # the whole batch of 4
    "routing": {"kind": "tread", "start": 1, "end": 3},
    "repa": {"kind": "repa", "block": 0, "teacher": {"kind": "tiny"}},
    "flow": {"prediction": "x", "shift": 2.0},
}
GOLDEN = {
    "baseline": (
        {},
        [1.8553733825683594, 1.7805871963500977, 1.4608184099197388,
         1.3254660367965698, 1.3469454050064087, 1.4391323328018188],
        1.4652755931019783,
    ),
    "every-factor": (
        EVERY_FACTOR,
        [2.4832606315612793, 0.8500503301620483, 0.9435817003250122,
         1.5192115306854248, 0.8179031610488892, 1.237184762954712],
        26.37082954752259,
    ),
    # Recorded before `model.init` existed (the class's own init, then the only one): PRX's init
    # (the default since) changes nothing but the final layer, so the old numbers must still come out.
    "baseline-diffusers-init": (
        {"model": {"init": "diffusers"}},
        [2.4182052612304688, 2.134099006652832, 1.836514949798584,
         1.6870875358581543, 1.6349592208862305, 1.7472299337387085],
        1.7101998552680016,
    ),
}  # fmt: skip


def _same_machine_kind() -> bool:
    return (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability()) == RECORDED_ON


@pytest.mark.parametrize("name", list(GOLDEN))
def test_logged_losses_are_the_golden_ones(name, tmp_path, tiny_cfg):
    overrides, losses, val_loss = GOLDEN[name]
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(merge(merge(tiny_cfg, SHORT), overrides)))
    job.run(run_dir)
    val = final_metrics(run_dir)["val_loss"]
    logged = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    if _same_machine_kind():
        assert logged == losses and val == val_loss
    else:
        assert logged == pytest.approx(losses, rel=1e-5)
        assert val == pytest.approx(val_loss, rel=1e-5)
