"""Calibrated, and proven so: ablations with known effects, simulated through real run records and ranked by
`ablate rank --format json`, exactly as a user's sweep is.

Seed level: y[arm, seed] = μ + δ_arm + β_seed + σ_arm·ε, seven deltas, 2-4 seeds (or a baseline with
more seeds than the deltas), ε normal or t₃, σ_arm equal or drawn from the scaled inverse-χ² prior
the moderated interval assumes. Eval level (one seed): each arm's metric is the mean of per-prompt
scores over 200 prompts, with the prompt resamples the trainer keeps (eval.distances.resample_counts).

Asserted over the ≥ 2,000 simulated changes: 95% intervals cover the true change 93-97% of the time
under the model they assume; with no effect at all, the share of sweeps with any false mark is not
above the stated 5% (the Clopper–Pearson lower bound of the observed share stays below it); at two
seeds the moderated interval finds more of the true effects than the plain paired t, while the
share of its marks that are false stays within 5%.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.stats
import yaml

from core.records import EvalRecord, Result, Spec, Throughput
from core.rundir import RunDir
from eval.distances import resample_counts

K, STEP, PROMPTS, RESAMPLES = 7, 100, 200, 400
EFFECTS = (0.0, 0.0, 0.0, 0.0, 1.5, 2.0, 3.0)  # in units of the seed noise of one arm


@dataclass(frozen=True)
class Scenario:
    sweeps: int
    seeds: int | tuple[int, int]  # all arms, or (baseline, deltas)
    noise: str = "normal"  # normal | t3
    unequal: bool = False  # σ_arm² from the moderated prior (d0 = 4)
    effects: tuple[float, ...] = EFFECTS
    metrics: int = 1


SEED_LEVEL = {
    "n2": Scenario(100, 2),
    "n2-t3-unequal": Scenario(70, 2, "t3", unequal=True),
    "n3-unequal": Scenario(50, 3, unequal=True),
    "n4": Scenario(30, 4),
    "baseline-4-deltas-2": Scenario(40, (4, 2)),
}
NULL = Scenario(300, 2, effects=(0.0,) * K, metrics=2)


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    """Thousands of records: written atomically as always, without waiting for the disk each time."""
    import core.atomic

    monkeypatch.setattr(core.atomic, "fsync_file", lambda path: None)
    monkeypatch.setattr(core.atomic, "fsync_dir", lambda path: None)


def write_sweep(root, name: str, scenario: Scenario, metrics: list[str]) -> str:
    base, deltas = scenario.seeds if isinstance(scenario.seeds, tuple) else (scenario.seeds,) * 2
    seeds = (
        list(range(base))
        if base == deltas
        else {"baseline": list(range(base)), "deltas": list(range(deltas))}
    )
    body = {"name": name, "output_dir": str(root / name), "baseline": {"eval": {"metrics": ["prompt_adherence"]}},
            "deltas": {f"d{k}": {"optimizer.lr": 0.01 * (k + 2)} for k in range(K)}, "seeds": seeds, "rank_by": metrics}  # fmt: skip
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def write_arm(root, name: str, delta: str, seed: int, metrics: dict[str, float], resamples=None) -> None:
    run = RunDir(root / name / f"{delta}-s{seed}")
    run.path.mkdir(parents=True)
    run.write_spec(Spec(name=run.name, delta=delta, seed=seed, hash="0" * 12, hash_version=2, sweep=name))
    run.set_status("running", step=STEP)
    run.set_status("done", step=STEP)
    run.write_result(Result(step=STEP, throughput=Throughput(batches_per_s=10.0)))
    names = run.write_resamples(STEP, resamples) if resamples is not None else []
    run.write_eval(EvalRecord(step=STEP, metrics=metrics, resampled=names))


def noise(rng, kind: str, size) -> np.ndarray:
    if kind == "t3":
        return rng.standard_t(3, size) / math.sqrt(3.0)  # unit variance
    return rng.standard_normal(size)


def simulate_seed_level(root, name: str, s: Scenario, rng) -> str:
    """One sweep; returns its file. Metric m's value: μ + δ + β_seed + σ_arm·ε (val_loss, prompt_adherence)."""
    metrics = ["val_loss", "prompt_adherence"][: s.metrics]
    path = write_sweep(root, name, s, metrics)
    base, deltas = s.seeds if isinstance(s.seeds, tuple) else (s.seeds,) * 2
    sigma = {
        d: math.sqrt(4 / rng.chisquare(4)) if s.unequal else 1.0
        for d in ["baseline", *(f"d{k}" for k in range(K))]
    }
    beta = {m: rng.normal(0, 2.0, max(base, deltas)) for m in metrics}  # the seed effect pairing removes
    for delta, effect in [("baseline", 0.0), *((f"d{k}", e) for k, e in enumerate(s.effects))]:
        for seed in range(base if delta == "baseline" else deltas):
            values = {
                m: 10.0 + effect + beta[m][seed] + sigma[delta] * float(noise(rng, s.noise, None))
                for m in metrics
            }
            write_arm(root, name, delta, seed, values)
    return path


def simulate_eval_level(root, name: str, rng) -> str:
    """One seed; each arm's metric the mean of its prompts' scores, with the trainer's resamples."""
    s = Scenario(1, 1)
    path = write_sweep(root, name, s, ["val_loss"])
    prompt = rng.normal(0, 1.0, PROMPTS)  # what a prompt does to every arm alike
    counts = resample_counts(PROMPTS, RESAMPLES)
    for delta, effect in [("baseline", 0.0), *((f"d{k}", 0.1 * e) for k, e in enumerate(EFFECTS))]:
        scores = 5.0 + effect + prompt + rng.normal(0, 1.0, PROMPTS)
        write_arm(
            root, name, delta, 0, {"val_loss": float(scores.mean())}, {"val_loss": counts @ scores / PROMPTS}
        )
    return path


def ranked(cli, path: str, *options: str) -> list[dict]:
    result = cli("rank", path, "--format", "json", *options)
    assert result.code == 0, result.err
    return json.loads(result.out)["rows"]


def truth(scenario_effects, delta: str) -> float:
    return scenario_effects[int(delta[1:])]


def tally(rows: list[dict], effects, metric: str, scale: float = 1.0) -> dict[str, int]:
    """How the deltas' intervals and marks did against the truth."""
    out = dict.fromkeys(("changes", "covered", "true", "found", "marks", "false_marks"), 0)
    for r in rows:
        if r["delta"] == "baseline" or r[f"{metric}_ci_low"] is None:
            continue
        true = scale * truth(effects, r["delta"])
        out["changes"] += 1
        out["covered"] += r[f"{metric}_ci_low"] <= true <= r[f"{metric}_ci_high"]
        out["true"] += true != 0
        out["marks"] += r[f"{metric}_significant"]
        out["found"] += r[f"{metric}_significant"] and true != 0
        out["false_marks"] += r[f"{metric}_significant"] and true == 0
    return out


def add(total: dict, part: dict) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("calibration"), np.random.default_rng(20261205)
    seed_level = {key: [simulate_seed_level(root, f"{key}-{i}", s, rng) for i in range(s.sweeps)]
                  for key, s in SEED_LEVEL.items()}  # fmt: skip
    null = [simulate_seed_level(root, f"null-{i}", NULL, rng) for i in range(NULL.sweeps)]
    eval_level = [simulate_eval_level(root, f"eval-{i}", rng) for i in range(60)]
    return seed_level, null, eval_level


def test_intervals_cover_the_true_change_as_often_as_they_say(runs, cli):
    seed_level, _, eval_level = runs
    parts: dict[str, dict] = {}
    for key, paths in seed_level.items():
        parts[key] = {}
        for path in paths:
            add(parts[key], tally(ranked(cli, path), SEED_LEVEL[key].effects, "val_loss"))
    parts["eval level, 1 seed"] = {}
    for path in eval_level:
        add(parts["eval level, 1 seed"], tally(ranked(cli, path), EFFECTS, "val_loss", scale=0.1))
    coverage = {key: part["covered"] / part["changes"] for key, part in parts.items()}
    print(
        "\n".join(
            f"{key}: coverage {c:.3f} over {parts[key]['changes']} changes" for key, c in coverage.items()
        )
    )
    assert all(0.90 <= c <= 0.985 for c in coverage.values()), coverage  # each scenario, within its MC noise
    changes = sum(part["changes"] for part in parts.values())
    assert changes >= 2000
    assert 0.93 <= sum(part["covered"] for part in parts.values()) / changes <= 0.97


def test_with_no_effect_at_all_the_share_of_sweeps_with_a_false_mark_is_within_the_stated_rate(runs, cli):
    _, null, _ = runs
    marked = sum(
        any(r[f"{m}_significant"] for r in ranked(cli, p) for m in ("val_loss", "prompt_adherence"))
        for p in null
    )
    low = scipy.stats.binomtest(marked, len(null)).proportion_ci(0.95, method="exact").low
    print(f"null sweeps with a false mark: {marked}/{len(null)} = {marked / len(null):.3f}")
    assert len(null) * 2 * K >= 2000 and low <= 0.05


def test_at_two_seeds_the_moderated_interval_finds_more_true_effects_than_the_plain_one(runs, cli):
    seed_level, _, _ = runs
    totals, shares = {"moderated": {}, "paired-t": {}}, {"moderated": [], "paired-t": []}
    for path in seed_level["n2"]:
        for method, total in totals.items():
            part = tally(ranked(cli, path, "--interval", method), EFFECTS, "val_loss")
            shares[method].append(
                part["false_marks"] / max(part["marks"], 1)
            )  # this sweep's false-discovery share
            add(total, part)
    fdr = {method: float(np.mean(s)) for method, s in shares.items()}
    found = {method: total["found"] for method, total in totals.items()}
    print(f"true effects found of {totals['moderated']['true']}: {found}; false-discovery rate {fdr}")
    assert found["moderated"] > 1.5 * found["paired-t"]
    assert fdr["moderated"] <= 0.05 + 2 * np.std(shares["moderated"]) / math.sqrt(len(shares["moderated"]))
