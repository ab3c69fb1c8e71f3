"""An arm's identity (trainer/identity.py): each config field trains, runs or evaluates, and `ablate run`
answers a finished arm's changed setting by its role: trains → config changed; runs → recorded, not
rerun; evaluates → its newest kept checkpoint re-scored, no training.

The fields hashed at HASH_VERSION are frozen in identity_fields.json: a field added since must declare its
neutral value (`mark(role, neutral=...)`), so that it leaves the hash of older configs as it was.
Regenerate the file only with a HASH_VERSION bump:

    ABLATE_FREEZE_IDENTITY=1 .venv/bin/python -m pytest tests/ablate/test_identity.py
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml
from ablate_testing import SWEEP, write_json
from pydantic import BaseModel, Field

from ablate.running.rescore import queue
from ablate.running.store import plan
from ablate.sweep.expand import config_hash, config_identity, expand
from ablate.sweep.schema import load_sweep
from core.rundir import RunDir
from trainer.config import TrainConfig
from trainer.identity import EVALUATES, HASH_VERSION, ROLES, RUNS, TRAINS, digest, identity, mark, table

FROZEN = Path(__file__).with_name("identity_fields.json")


def replace(old: str, new: str, text: str = SWEEP) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def arms(write_sweep, text: str = SWEEP) -> dict:
    return {s.name: s for s in expand(load_sweep(write_sweep(text)))}


def finished(root: Path, spec, *, record: dict | None = None, config: dict | None = None) -> Path:
    """A done arm's run folder as its training leaves it: records, two eval steps, two kept checkpoints."""
    run_dir = root / spec.name
    write_json(run_dir / "spec.json", record or spec.record("t").to_json())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config or spec.config, sort_keys=False))
    write_json(run_dir / "status.json", {"state": "done", "step": 4, "total_steps": 4})
    write_json(run_dir / "result.json", {"step": 4})
    for step in (2, 4):
        write_json(run_dir / "eval" / f"step_{step}.json", {"step": step, "metrics": {"val_loss": 0.3}})
        (RunDir(run_dir).checkpoint(step)).mkdir(parents=True)
    return run_dir


# --- the role table ---------------------------------------------------------------------------------------


def test_the_role_table_marks_every_execution_and_evaluation_setting():
    roles = {path: row["role"] for path, row in table(TrainConfig).items()}
    assert set(roles.values()) == set(ROLES)
    runs = ["weights_dir", "train.num_workers", "train.threads", "train.compile", "checkpoint.every",
            "checkpoint.keep", "log.every", "log.wandb.mode", "eval.cache_dir", "cache", "cache.dir", "parallel",
            "parallel<fsdp>.hybrid", "parallel<fsdp>.mixed_precision", "parallel<fsdp>.reshard_after_forward"]  # fmt: skip
    evaluates = ["eval.every", "eval.batch_size", "eval.metrics", "eval.samples", "eval.sample_steps",
                 "eval.guidance", "eval.caption", "eval.resamples", "eval.reference.path", "eval.reference.caption"]  # fmt: skip
    trains = ["seed", "model.preset", "model.init", "flow.shift", "train.steps", "train.batch_size",
              "train.caption_dropout", "data<synthetic>.num_val", "data<parquet>.path", "optimizer<adamw>.lr",
              "precision<bf16>.autocast", "ema", "ema.decay", "repa<repa>.teacher<dinov2-vitl14>.kind"]  # fmt: skip
    assert {p: roles[p] for p in runs} == dict.fromkeys(runs, RUNS)
    assert {p: roles[p] for p in evaluates} == dict.fromkeys(evaluates, EVALUATES)
    assert {p: roles[p] for p in trains} == dict.fromkeys(trains, TRAINS)


def test_every_field_hashed_at_this_version_is_frozen_and_a_new_one_declares_its_neutral_value():
    rows = table(TrainConfig)
    hashed = {path: row["role"] for path, row in rows.items() if row["role"] != RUNS and "neutral" not in row}
    frozen = json.loads(FROZEN.read_text()) if FROZEN.exists() else {"hash_version": None, "fields": {}}
    if os.environ.get("ABLATE_FREEZE_IDENTITY") and frozen["hash_version"] != HASH_VERSION:
        frozen = {"hash_version": HASH_VERSION, "fields": hashed}
        FROZEN.write_text(json.dumps(frozen, indent=1, sort_keys=True) + "\n")
    assert frozen["hash_version"] == HASH_VERSION, (
        f"HASH_VERSION is {HASH_VERSION}, {FROZEN.name} is for {frozen['hash_version']}: regenerate it "
        "(ABLATE_FREEZE_IDENTITY=1, see this module's docstring)"
    )
    new = sorted(set(hashed) - set(frozen["fields"]))
    assert not new, (
        f"{new} change the hash of every config recorded before them: declare each one's neutral value, "
        "mark(role, neutral=<the value that trains as before it existed>) (trainer/identity.py), "
        "or bump HASH_VERSION"
    )
    moved = sorted(p for p, role in frozen["fields"].items() if p in rows and hashed.get(p) != role)
    assert not moved, (
        f"{moved} changed role or gained a neutral value: that changes old hashes; bump HASH_VERSION"
    )


# --- the hashes -------------------------------------------------------------------------------------------


def test_a_field_at_its_neutral_value_hashes_as_if_it_did_not_exist(write_sweep):
    config = arms(write_sweep)["baseline-s0"].config
    assert config["model"]["init"] == "prx" and config["ema"] is None and config["eval"]["resamples"] == 1000

    def without(*path: str) -> dict:
        out = copy.deepcopy(config)
        node = out
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return out

    def at(value, *path: str) -> dict:
        out = without(*path)
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return out

    # model.init came after hashes existed; before it, the class's own init (diffusers) was the only one
    assert config_hash(without("model", "init")) == config_hash(at("diffusers", "model", "init"))
    assert config_hash(without("model", "init")) != config_hash(config)  # its default, prx, trains otherwise
    assert config_hash(without("ema")) == config_hash(config)  # an optional factor that is off
    evaluated = config_identity(without("eval", "resamples")).eval_hash
    assert evaluated == config_identity(at(0, "eval", "resamples")).eval_hash
    assert evaluated != config_identity(config).eval_hash


def test_the_neutral_value_is_declared_not_read_from_the_default():
    class Before(BaseModel):
        lr: float = 1e-3

    class Added(BaseModel):  # a field added later, its default doing what was done before it
        lr: float = 1e-3
        shift: float = Field(1.0, json_schema_extra=mark(TRAINS, neutral=1.0))

    class DefaultChanged(BaseModel):  # its default changed later still
        lr: float = 1e-3
        shift: float = Field(3.0, json_schema_extra=mark(TRAINS, neutral=1.0))

    old = identity(Before, Before().model_dump()).hash
    assert identity(Added, Added().model_dump()).hash == old
    assert identity(Added, {"lr": 1e-3}).hash == old  # as an older config.yaml holds it
    assert (
        identity(DefaultChanged, DefaultChanged().model_dump()).hash != old
    )  # the resolved config is hashed


@pytest.mark.parametrize(
    ("edit", "moves"),
    [
        ({"train": {"num_workers": 2, "compile": "off"}, "parallel": {"kind": "fsdp"}}, ()),
        ({"checkpoint": {"every": 3, "keep": 1}, "log": {"every": 2}, "weights_dir": "/w"}, ()),
        ({"eval": {"every": 1, "batch_size": 4}}, ("eval_hash",)),
        ({"eval": {"cache_dir": "/elsewhere"}}, ()),
        ({"optimizer": {"lr": 2e-3}}, ("hash",)),
    ],
    ids=["runs", "runs-paths", "evaluates", "evaluates-path", "trains"],
)
def test_each_role_moves_only_its_own_hash(write_sweep, edit, moves):
    from ablate.sweep.expand import merge

    config = arms(write_sweep)["baseline-s0"].config
    before, after = config_identity(config), config_identity(merge(config, edit)[0])
    assert {k for k in ("hash", "eval_hash") if getattr(before, k) != getattr(after, k)} == set(moves)


# --- what `ablate run` does -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "action", "line"),
    [
        (replace("threads: 1}", "threads: 1, num_workers: 2}"), "skip",
         "runs: train.num_workers 0 → 2 (recorded, not rerun)"),
        (replace("checkpoint: {every: 2}", "checkpoint: {every: 2}\n  parallel: {kind: fsdp}"), "skip",
         'runs: parallel.kind "ddp" → "fsdp" (recorded, not rerun)'),
        (replace("eval: {every: 2, batch_size: 8}", "eval: {every: 2, batch_size: 4}"), "rescore",
         "evaluates: eval.batch_size 8 → 4 (re-scored at step 4)"),
        (replace("eval: {every: 2, batch_size: 8}", "eval: {every: 1, batch_size: 8}"), "rescore",
         "evaluates: eval.every 2 → 1 (re-scored at step 4)"),
        (replace("lr: 1.0e-3}", "lr: 2.0e-3}"), "blocked", "trains: optimizer.lr 0.001 → 0.002 (config changed)"),
    ],
    ids=["runs", "runs-parallel", "evaluates", "evaluates-every", "trains"],
)  # fmt: skip
def test_a_finished_arm_after_a_sweep_edit_of_each_kind(write_sweep, workdir, text, action, line):
    root = workdir / "runs" / "t"
    finished(root, arms(write_sweep)["baseline-s0"])
    now = arms(write_sweep, text)["baseline-s0"]
    (d,) = plan([now], root)
    assert (d.action, d.changes()) == (action, [line])
    assert d.step == (4 if action == "rescore" else None)


def test_an_older_spec_is_hashed_again_and_blocked_only_by_the_trainer_numerics_it_trained_by(
    write_sweep, workdir
):
    root = workdir / "runs" / "t"
    then = arms(write_sweep)["baseline-s0"]
    ran = copy.deepcopy(then.config)  # recorded before `parallel` and `train.compile` existed
    del ran["parallel"], ran["train"]["compile"]
    v2 = digest({k: v for k, v in ran.items() if k != "log"})  # HASH_VERSION 2: all but `log`
    record = {**then.record("t").to_json(), "hash": v2, "hash_version": 2}
    del record["eval_hash"], record["roles"]
    finished(root, then, record=record, config=ran)
    now = arms(write_sweep, replace("threads: 1}", "threads: 1, num_workers: 4, compile: auto}"))[
        "baseline-s0"
    ]
    assert now.hash != v2  # hashed another way: the folder's config.yaml is hashed again
    (d,) = plan([now], root)
    # how it ran is told apart from what it trained; what blocks it is the numerics it trained by:
    # before HASH_VERSION 4 the trainer's random draws were keyed per process, not per sample
    assert d.action == "blocked"
    assert d.changes() == [
        "trains: numerics 1 → 2 (config changed)",
        "runs: train.num_workers 0 → 4 (recorded, not rerun)",
        'runs: train.compile (absent) → "auto" (recorded, not rerun)',
        'runs: parallel (absent) → {"kind": "ddp"} (recorded, not rerun)',
    ]


def test_a_rescore_takes_the_new_evaluation_settings_and_keeps_how_it_ran(write_sweep, workdir):
    root = workdir / "runs" / "t"
    run_dir = finished(root, arms(write_sweep)["baseline-s0"])
    text = replace(
        "eval: {every: 2, batch_size: 8}", "eval: {every: 2, batch_size: 4, cache_dir: /elsewhere}"
    )
    now = arms(write_sweep, replace("threads: 1}", "threads: 1, num_workers: 2}", text))["baseline-s0"]
    (d,) = plan([now], root)
    assert d.action == "rescore"
    (target,) = queue([d], "t", "debug")
    assert (target.run_dir, target.step) == (run_dir, 4)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["eval"]["batch_size"] == 4  # scored with the sweep's settings now
    assert (config["eval"]["cache_dir"], config["train"]["num_workers"]) == (None, 0)  # how it ran: recorded
    assert config_identity(config).hash == now.hash and config_identity(config).eval_hash == now.eval_hash
    spec = json.loads((run_dir / "spec.json").read_text())
    assert (spec["hash"], spec["eval_hash"], spec["hash_version"]) == (now.hash, now.eval_hash, HASH_VERSION)
    assert json.loads((run_dir / "eval_job.json").read_text())["state"] == "queued"


def test_a_rescore_is_planned_until_the_newest_scores_carry_the_new_evaluation_settings(write_sweep, workdir):
    root = workdir / "runs" / "t"
    then = arms(write_sweep)["baseline-s0"]
    run_dir = finished(root, then)
    stamp = {"step": 4, "metrics": {"val_loss": 0.3}, "hash_version": HASH_VERSION}
    write_json(run_dir / "eval" / "step_4.json", {**stamp, "eval_hash": then.eval_hash})
    now = arms(write_sweep, replace("batch_size: 8}", "batch_size: 4}"))["baseline-s0"]
    queue(plan([now], root), "t", "debug")
    write_json(run_dir / "eval_job.json", {"state": "failed", "step": 4, "error": "CUDA out of memory"})
    (d,) = plan([now], root)  # config.yaml and spec.json say the new settings; its scores do not
    assert d.action == "rescore" and "its newest scores were made with other evaluation settings" in d.reason
    write_json(
        run_dir / "eval" / "step_4.json", {**stamp, "eval_hash": now.eval_hash}
    )  # the job's, when done
    assert plan([now], root)[0].action == "skip"


def test_ablate_run_rescores_a_changed_evaluation_and_records_a_changed_execution_setting(
    write_sweep, cli, workdir
):
    path = write_sweep()
    assert "2/2 arm(s) done" in cli("run", path).out
    root = workdir / "runs" / "t"
    logs = {arm: (root / arm / "log.jsonl").read_text() for arm in ("baseline-s0", "lr-high-s0")}
    edited = replace("threads: 1}", "threads: 1, num_workers: 2}")
    write_sweep(replace("eval: {every: 2, batch_size: 8}", "eval: {every: 2, batch_size: 4}", edited))

    dry = cli("run", path, "--dry-run")
    assert dry.code == 0, dry.out + dry.err
    assert "lr-high-s0: runs: train.num_workers 0 → 2 (recorded, not rerun)" in dry.out
    assert "lr-high-s0: evaluates: eval.batch_size 8 → 4 (re-scored at step 4)" in dry.out
    again = cli("run", path)
    assert again.code == 0, again.out + again.err
    assert "2/2 arm(s) evaluated" in again.out and "arm(s) done" not in again.out  # nothing trained
    for arm, log in logs.items():
        run = RunDir(root / arm)
        spec, scores = run.read_spec(), run.eval_records()[4]
        assert scores.eval_hash == spec.eval_hash and spec.eval_hash == config_identity(yaml.safe_load(
            run.config.read_text())).eval_hash  # fmt: skip
        assert (run.path / "log.jsonl").read_text() == log
    assert "nothing to submit" in cli("run", path).out
    assert "changed" not in " ".join(cli("status", path).out.split())
