"""`ablate stack`: the significant winners stacked into a new baseline, one leave-one-out delta each; it validates and runs."""

from __future__ import annotations

import yaml
from ablate_testing import SWEEP, write_json

from ablate.sweep.expand import expand
from ablate.sweep.schema import load_sweep

DELTAS = """\
deltas:
  lr-high:
    optimizer.lr: 3e-3
  ema:
    ema: {kind: ema, decay: 0.9}
  contrastive:
    contrastive: {kind: contrastive, group: 2}
  clip:
    train.grad_clip: 0.5
seeds: [0, 1]
"""
# val_loss per delta and seed: lr-high and ema clearly better, contrastive noise, clip worse.
LOSS = {
    "baseline": (1.00, 1.10), "lr-high": (0.80, 0.92), "ema": (0.90, 1.01),
    "contrastive": (0.95, 1.16), "clip": (1.20, 1.31),
}  # fmt: skip


def results(root):
    for delta, losses in LOSS.items():
        for seed, loss in enumerate(losses):
            arm = root / f"{delta}-s{seed}"
            write_json(arm / "spec.json", {"name": arm.name})
            write_json(arm / "status.json", {"state": "done", "step": 4})
            write_json(arm / "result.json", {"step": 4, "throughput": {"batches_per_s": 10.0}})
            write_json(arm / "eval" / "step_4.json", {"step": 4, "metrics": {"val_loss": loss}})


def test_stack_writes_a_sweep_of_the_winners_that_validates_and_runs(write_sweep, cli, workdir):
    path = write_sweep(SWEEP.replace("deltas:\n  lr-high:\n    optimizer.lr: 3e-3\nseeds: [0]\n", DELTAS))
    sweep = load_sweep(path)
    results(sweep.root)
    result = cli("stack", path, "--top", "3")
    assert result.code == 0, result.err
    assert "stacked lr-high, ema (step 4)" in result.out  # contrastive's interval includes zero: not stacked
    stacked_path = workdir / "sweep-stack.yaml"
    text = stacked_path.read_text()
    assert text.startswith("# Stacked from") and "#   lr-high: val_loss -0.19" in text
    new = yaml.safe_load(text)
    assert new["baseline"]["optimizer"]["lr"] == 3e-3 and new["baseline"]["ema"] == {
        "kind": "ema",
        "decay": 0.9,
    }
    assert new["deltas"] == {"without-lr-high": {"optimizer.lr": 1e-3}, "without-ema": {"ema": None}}
    specs = expand(load_sweep(stacked_path))
    assert [s.name for s in specs] == [
        f"{d}-s{s}" for d in ("baseline", "without-lr-high", "without-ema") for s in (0, 1)
    ]
    again = cli("stack", path)
    assert again.code == 2 and "exists; not overwritten" in again.err
    ran = cli("run", stacked_path)  # the debug executor trains the six tiny arms here
    assert ran.code == 0 and "6/6 arm(s) done" in ran.out


def test_stack_needs_a_significant_winner_or_any(write_sweep, cli):
    path = write_sweep(SWEEP.replace("deltas:\n  lr-high:\n    optimizer.lr: 3e-3\nseeds: [0]\n", DELTAS))
    sweep = load_sweep(path)
    results(sweep.root)
    LOSS_BACKUP = dict(LOSS)
    try:
        LOSS.update(
            {"lr-high": (0.8, 1.2), "ema": (1.2, 0.9)}
        )  # improvements no interval can tell from noise
        results(sweep.root)
        refused = cli("stack", path, "--top", "1")
        assert (
            refused.code == 2 and "no delta improved it with a 95% interval that excludes zero" in refused.err
        )
        taken = cli("stack", path, "--top", "1", "--any", "--out", "any.yaml")
        assert taken.code == 0 and "stacked lr-high" in taken.out  # the best mean, with --any
    finally:
        LOSS.clear()
        LOSS.update(LOSS_BACKUP)


def test_a_stacked_name_too_long_is_said_of_the_users_sweep_file(write_sweep, cli, workdir):
    name = "n" * 96  # the stacked sweep is named n...n-stack: 102 characters, two over the limit
    text = SWEEP.replace("name: t", f"name: {name}").replace(
        "deltas:\n  lr-high:\n    optimizer.lr: 3e-3\nseeds: [0]\n", DELTAS
    )
    path = write_sweep(text)
    results(load_sweep(path).root)
    refused = cli("stack", path, "--top", "2")
    assert refused.code == 2 and refused.err.count("\n") == 1, refused
    assert refused.err.startswith(
        f"error: {path}: the stacked sweep for {workdir / 'sweep-stack.yaml'} does not validate, nothing written: "
        "name: "
    ), refused.err
    assert "102" in refused.err and ".tmp" not in refused.err
    assert sorted(p.name for p in workdir.iterdir()) == ["runs", "sweep.yaml"]
