"""`ablate run --resolve`: a confirmatory second stage for the verdicts the first seeds leave open, sized
from the first stage, its verdicts from its own seeds alone, and only one of it."""

from __future__ import annotations

import json

import yaml
from ablate_testing import SWEEP

from ablate.sweep.expand import expand
from ablate.sweep.schema import load_sweep
from core.records import EvalRecord, Result, Throughput
from core.rundir import RunDir
from core.sweepdir import SweepDir

DELTAS = """\
deltas:
  clear:
    optimizer.lr: 5e-3
  open:
    optimizer.lr: 2e-3
  flat:
    optimizer.lr: 3e-3
seeds: [0, 1]
"""
# val_loss at step 4: `clear` 0.5 below the baseline at both seeds, `open` +0.02 / -0.01 (unresolved)
VALUES = {"baseline": (1.0, 1.2), "clear": (0.5, 0.7), "open": (1.02, 1.19), "flat": (1.0, 1.21)}


def first_stage(write_sweep):
    """The sweep's first stage, as its finished arms left it (records written as the trainer writes them)."""
    path = write_sweep(SWEEP.replace("deltas:\n  lr-high:\n    optimizer.lr: 3e-3\nseeds: [0]\n", DELTAS))
    sweep = load_sweep(path)
    SweepDir(sweep.root).root.mkdir(parents=True)
    SweepDir(sweep.root).write_mark(sweep.name)
    for spec in expand(sweep):
        run = RunDir(sweep.root / spec.name)
        run.path.mkdir()
        run.write_config(yaml.safe_dump(spec.config, sort_keys=False))
        run.write_spec(spec.record(sweep.name))
        run.set_status("running", step=4)
        run.set_status("done", step=4)
        run.write_result(Result(step=4, throughput=Throughput(batches_per_s=20.0)))
        run.write_eval(EvalRecord(step=4, metrics={"val_loss": VALUES[spec.delta][spec.seed]}))
    return path, sweep


def test_the_plan_re_tests_only_open_verdicts_and_a_dry_run_records_nothing(write_sweep, cli):
    path, sweep = first_stage(write_sweep)
    result = cli("run", path, "--resolve", "--dry-run", "--min-effect", "val_loss=0.1")
    assert result.code == 0, result.err
    assert "clear:" not in result.out  # resolved at the first stage: no more seeds
    assert "open: val_loss re-tested (" in result.out and "flat: val_loss re-tested (" in result.out
    assert "second stage: " in result.out and "GPU-hours" in result.out and "dry run" in result.out
    assert not SweepDir(sweep.root).stage2.exists()
    nothing = cli("run", path, "--resolve", "--budget-gpu-hours", "0", "--min-effect", "val_loss=0.1")
    assert nothing.code == 0 and "left open, the budget does not reach it" in nothing.out
    assert "nothing to re-test" in nothing.out and not SweepDir(sweep.root).stage2.exists()
    bad = cli("run", path, "--resolve", "--min-effect", "fid=0.1")
    assert bad.code == 2 and "--min-effect: 'fid=0.1' is not METRIC=SIZE" in bad.err


def test_the_second_stage_trains_new_seeds_and_its_verdicts_come_from_them_alone(write_sweep, cli):
    path, sweep = first_stage(write_sweep)
    result = cli("run", path, "--resolve", "--min-effect", "val_loss=1.0")  # large: few seeds suffice
    assert result.code == 0, result.out + result.err
    plan = SweepDir(sweep.root).read_stage2()
    assert (
        plan.first_seeds == [0, 1]
        and set(plan.cells) == {"open", "flat"}
        and plan.cells["open"] == ["val_loss"]
    )
    new = plan.deltas["open"]
    assert new[0] == 2 and plan.baseline[: len(new)] == new  # new seeds, paired with new baseline seeds
    for delta, seeds in [("baseline", plan.baseline), *plan.deltas.items()]:
        for seed in seeds:
            assert RunDir(sweep.root / f"{delta}-s{seed}").read_status().state == "done"
    assert not (sweep.root / "clear-s2").exists()  # a resolved verdict gets no seeds
    rows = {r["delta"]: r for r in json.loads(cli("rank", path, "--format", "json").out)["rows"]}
    assert rows["open"]["stage"] == 2 and rows["open"]["val_loss_pairs"] == len(new)
    assert rows["open"]["seeds"] == f"2/2, then {len(new)}/{len(new)}"
    assert rows["clear"]["stage"] == 1 and rows["clear"]["val_loss_change"] == -0.5
    again = cli("run", path, "--resolve")
    assert again.code == 2 and "a second stage is planned already" in again.err
