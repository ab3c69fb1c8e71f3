"""The ranking's numbers on hand-written run directories: known inputs, exact changes, order, states."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from ablate_testing import write_json

from ablate.results.rank import ArmResult, Method, default_step, rank, rank_table
from ablate.sweep.schema import load_sweep
from core.records import EvalRecord, Throughput

SWEEP = """\
name: r
baseline: {eval: {metrics: [prompt_adherence]}}
deltas:
  a: {x: 1}
  b: {x: 2}
  c: {x: 3}
  d: {x: 4}
seeds: [0, 1]
rank_by:
  - val_loss: lower
  - prompt_adherence: higher
"""


def done(root, name, by_step: dict[int, dict], bps: float | None = 10.0):
    final = max(by_step)
    write_json(root / name / "spec.json", {"name": name})
    write_json(root / name / "status.json", {"state": "done", "step": final})
    for step, metrics in by_step.items():  # as the trainer writes them: eval/ holds the metrics per step
        write_json(root / name / "eval" / f"step_{step}.json", {"step": step, "metrics": metrics})
    write_json(
        root / name / "result.json",
        {
            "step": final,
            "metrics": by_step[final],
            "metrics_by_step": {str(k): v for k, v in by_step.items()},
            "throughput": {"batches_per_s": bps} if bps else {},
        },
    )


@pytest.fixture
def sweep(write_sweep):
    s = load_sweep(write_sweep(SWEEP))
    root = s.root
    done(
        root,
        "baseline-s0",
        {100: {"val_loss": 1.0, "prompt_adherence": 0.5}, 200: {"val_loss": 0.8, "prompt_adherence": 0.6}},
    )
    done(
        root,
        "baseline-s1",
        {100: {"val_loss": 1.2, "prompt_adherence": 0.4}, 200: {"val_loss": 1.0, "prompt_adherence": 0.5}},
    )
    done(root, "a-s0", {200: {"val_loss": 0.6, "prompt_adherence": 0.7}}, bps=5.0)
    done(root, "a-s1", {200: {"val_loss": 0.9, "prompt_adherence": 0.55}}, bps=5.0)
    done(root, "b-s0", {200: {"val_loss": 0.9, "prompt_adherence": 0.6}}, bps=12.0)
    write_json(root / "b-s1" / "spec.json", {"name": "b-s1"})
    write_json(root / "b-s1" / "status.json", {"state": "failed", "error": "FloatingPointError"})
    done(root, "c-s0", {200: {"val_loss": 0.7, "prompt_adherence": 0.6}})
    write_json(root / "c-s1" / "spec.json", {"name": "c-s1"})
    write_json(root / "c-s1" / "status.json", {"state": "running", "step": 150})
    write_json(
        root / "c-s1" / "eval" / "step_100.json",
        {"step": 100, "metrics": {"val_loss": 1.1, "prompt_adherence": 0.45}},
    )
    return s  # d: never launched


def evals(by_step: dict[int, dict]) -> dict[int, EvalRecord]:
    return {step: EvalRecord(step=step, metrics=metrics) for step, metrics in by_step.items()}


def row(df, delta: str) -> dict:
    return df.row(delta)


def test_changes_are_paired_by_seed_and_averaged(sweep):
    df, step, _ = rank(sweep)
    assert step == 200  # the last step every finished arm reached
    a = row(df, "a")
    assert a["state"] == "done" and a["seeds"] == "2/2"
    assert a["val_loss"] == pytest.approx(0.75)
    assert a["val_loss_change"] == pytest.approx(-0.15)  # (0.6-0.8 + 0.9-1.0) / 2
    assert row(rank(sweep, method=Method("paired-t")).table, "a")["val_loss_sd"] == pytest.approx(
        math.sqrt(0.005)
    )  # its own sample sd of (-0.2, -0.1)
    assert a["val_loss_change_pct"] == pytest.approx(-17.5)  # (-25% + -10%) / 2
    assert a["prompt_adherence_change"] == pytest.approx(0.075) and a[
        "prompt_adherence_change_pct"
    ] == pytest.approx((100 / 6 + 10) / 2)
    assert a["batches_per_s"] == pytest.approx(5.0) and a["throughput_ratio"] == pytest.approx(0.5)


def test_sorted_by_first_metric_improvement_baseline_first_missing_last(sweep):
    df, _, _ = rank(sweep)
    assert list(df["delta"]) == ["baseline", "a", "c", "b", "d"]
    base = row(df, "baseline")
    assert base["val_loss"] == pytest.approx(0.9) and math.isnan(base["val_loss_change"])
    assert base["seeds"] == "2/2" and base["batches_per_s"] == pytest.approx(10.0)


def test_running_failed_and_missing_arms_are_listed_with_their_state(sweep):
    df, _, _ = rank(sweep)
    b, c, d = row(df, "b"), row(df, "c"), row(df, "d")
    assert b["state"] == "1 done, 1 failed" and b["seeds"] == "1/2"
    assert b["val_loss_change"] == pytest.approx(0.1) and b["val_loss_pairs"] == 1
    # one seed: no spread of its own; moderated, it borrows the table's (one df is left by the fit)
    assert b["val_loss_df"] == 1 and b["val_loss_noise"] == "seed"
    plain = row(rank(sweep, method=Method("paired-t")).table, "b")
    assert math.isnan(plain["val_loss_sd"]) and math.isnan(plain["val_loss_ci_low"])
    assert b["throughput_ratio"] == pytest.approx(1.2)
    assert c["state"] == "1 done, 1 running" and c["val_loss_change"] == pytest.approx(-0.1)
    assert d["state"] == "missing" and d["seeds"] == "0/2" and math.isnan(d["val_loss_change"])


def test_higher_is_better_reverses_the_order():
    def arm(delta, seed, value):
        return ArmResult(f"{delta}-s{seed}", delta, seed, "done", evals({10: {"m": value}}))

    arms = [arm("baseline", 0, 1.0), arm("up", 0, 2.0), arm("down", 0, 0.5)]
    assert list(rank_table(arms, [("m", "higher")], 10)["delta"]) == ["baseline", "up", "down"]
    assert list(rank_table(arms, [("m", "lower")], 10)["delta"]) == ["baseline", "down", "up"]


def test_rank_at_an_earlier_step_uses_eval_files_of_running_arms(sweep):
    df, step, _ = rank(sweep, step=100)
    assert step == 100
    c = row(df, "c")
    assert c["val_loss_change"] == pytest.approx(-0.1)  # c-s1's step-100 eval vs baseline-s1 (1.1 - 1.2)
    assert c["state"] == "1 done, no step 100, 1 running" and c["seeds"] == "1/2"
    assert list(df["delta"])[:2] == ["baseline", "c"]


def test_default_step_is_the_last_step_all_finished_arms_reached():
    arms = [
        ArmResult("baseline-s0", "baseline", 0, "done", evals({100: {}, 200: {}})),
        ArmResult("x-s0", "x", 0, "done", evals({100: {}})),
        ArmResult("y-s0", "y", 0, "running", evals({100: {}, 200: {}, 300: {}})),
    ]
    assert default_step(arms) == 100
    assert default_step([ArmResult("y-s0", "y", 0, "running", evals({100: {}, 300: {}}))]) == 300
    assert default_step([ArmResult("y-s0", "y", 0, "missing")]) is None


def test_cli_formats(sweep, cli):
    sweep_file = sweep.file
    table = cli("rank", sweep_file)
    assert table.code == 0
    assert "change vs baseline at step 200" in table.out
    lines = table.out.splitlines()
    order = [
        next(i for i, line in enumerate(lines) if line.startswith(f"│ {d} "))
        for d in ("baseline", "a", "c", "b", "d")
    ]
    assert order == sorted(order)
    assert "-0.15 (-17.5%)" in table.out and "0.50x" in table.out
    plain = cli("rank", sweep_file, "--interval", "paired-t").out
    assert "[-0.785, +0.485]" in plain  # 95% paired t, 1 df: mean ± 12.71 · sd/√2
    assert "seed-ev" not in plain and " seed " in plain  # the noise it covers: seed alone (no resamples)
    assert "noise" in table.out and "seed ±" in table.out  # the seed spread of a change

    as_json = json.loads(cli("rank", sweep_file, "--format", "json").out)
    assert as_json["step"] == 200 and as_json["rank_by"] == [
        {"val_loss": "lower"},
        {"prompt_adherence": "higher"},
    ]
    assert as_json["rows"][1]["delta"] == "a" and as_json["rows"][1]["val_loss_change"] == pytest.approx(
        -0.15
    )
    assert as_json["rows"][-1]["val_loss_change"] is None

    csv = pd.read_csv(io.StringIO(cli("rank", sweep_file, "--format", "csv").out))
    assert list(csv["delta"]) == ["baseline", "a", "c", "b", "d"]
    assert csv.loc[1, "throughput_ratio"] == pytest.approx(0.5)

    markdown = cli("rank", sweep_file, "--format", "markdown", "--step", "100").out.splitlines()
    assert markdown[0] == (
        "| delta | state | seeds | val_loss ↓ | Δ [95% CI] noise | q | Δ% | prompt_adherence ↑ | Δ [95% CI] noise "
        "| q | Δ% | batches/s | speed [95% CI] | GPU-h | cost |"
    )
    assert markdown[4].startswith("| c | 1 done, no step 100, 1 running | 1/2 | 1.1 | -0.1 ")


def test_cli_rejects_unknown_step_and_format(sweep, cli):
    result = cli("rank", sweep.file, "--step", "150")
    assert result.code == 2 and result.err.strip() == (
        "error: --step: no arm has metrics at step 150; expected one of the evaluated steps: 100, 200"
    )
    result = cli("rank", sweep.file, "--format", "xml")
    assert result.code == 2 and "expected one of: table, csv, markdown, json" in result.err


def test_intervals_significance_noise_floor_and_cost_on_known_numbers():
    def arm(delta, seed, loss, bps=10.0):
        speed = Throughput(batches_per_s=bps)
        return ArmResult(
            f"{delta}-s{seed}", delta, seed, "done", evals({10: {"loss": loss}}), speed, steps=3600
        )

    arms = [arm("baseline", s, v) for s, v in enumerate((1.0, 1.1, 0.9))]
    arms += [arm("clear", s, v - 0.5, bps=20.0) for s, v in enumerate((1.0, 1.1, 0.9))]  # -0.5 at every seed
    arms += [arm("noise", s, v + d) for s, (v, d) in enumerate(((1.0, 0.1), (1.1, -0.1), (0.9, 0.05)))]
    df = rank_table(arms, [("loss", "lower")], 10, devices=8, method=Method("paired-t"))
    clear, noise = df.row("clear"), df.row("noise")
    assert clear["loss_change"] == pytest.approx(-0.5) and clear["loss_significant"]
    assert clear["loss_ci_low"] == pytest.approx(-0.5) == pytest.approx(clear["loss_ci_high"])  # no spread
    assert not noise["loss_significant"] and noise["loss_ci_low"] < 0 < noise["loss_ci_high"]
    assert noise["loss_pairs"] == 3 and noise["loss_df"] == 2
    assert df.row("baseline")["gpu_hours"] == pytest.approx(
        3600 / 10 / 3600 * 8
    )  # steps / (batches/s) x devices
    assert clear["cost_ratio"] == pytest.approx(0.5) and clear["throughput_ratio"] == pytest.approx(2.0)


def test_order_by_another_metric_and_the_html_table(sweep, cli):
    by_acc = cli("rank", sweep.file, "--by", "prompt_adherence", "--format", "csv")
    assert list(pd.read_csv(io.StringIO(by_acc.out))["delta"]) == ["baseline", "a", "b", "c", "d"]
    wrong = cli("rank", sweep.file, "--by", "fid")
    assert wrong.code == 2 and "--by: 'fid' is not one of the sweep's rank_by metrics" in wrong.err
    html = cli("rank", sweep.file, "--format", "html").out
    assert html.startswith("<!doctype html>") and '<table class="impact">' in html and "seed ±" in html


def test_speed_is_the_median_step_time_with_an_interval_and_a_drifting_arm_is_flagged():
    def arm(delta, seed, step_s, drift=1.0):
        rng = np.random.default_rng(seed)
        windows = list(step_s * (1 + 0.02 * rng.standard_normal(60)))
        windows[5] = step_s * 40  # an evaluation inside a log window: the median does not move
        speed = Throughput(batches_per_s=1 / np.mean(windows), step_s_median=float(np.median(windows)),
                           windows=windows, drift=drift)  # fmt: skip
        return ArmResult(
            f"{delta}-s{seed}", delta, seed, "done", evals({10: {"loss": 1.0}}), speed, steps=100
        )

    arms = [arm("baseline", s, 0.2) for s in (0, 1)]
    arms += [arm("fast", s, 0.1) for s in (0, 1)]
    arms += [arm("shared", 0, 0.2, drift=1.6), arm("shared", 1, 0.2)]
    table = rank_table(arms, [("loss", "lower")], 10, devices=1)
    fast, shared = table.row("fast"), table.row("shared")
    assert fast["throughput_ratio"] == pytest.approx(2.0, rel=0.02)  # the stall would make a mean say ~1.4x
    assert fast["speed_low"] < fast["throughput_ratio"] < fast["speed_high"]
    assert fast["speed_high"] / fast["speed_low"] < 1.1  # 60 windows at 2% spread: a tight interval
    assert math.isnan(fast["speed_drift"]) and shared["speed_drift"] == pytest.approx(1.6)
    medians = [float(np.median(a.throughput.windows)) for a in arms[:2]]
    assert table.row("baseline")["gpu_hours"] == pytest.approx(
        100 * np.mean(medians) / 3600
    )  # from the median
