"""The CLI surface: dry runs create nothing, start-up imports no torch, status shows each arm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ablate_testing import SWEEP, write_json

from core.sweepdir import SweepDir

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
SLURM = "launcher:\n  executor: slurm\n  partition: gpu\n  gpus_per_node: 8\n  array_parallelism: 1\n"


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_dry_run_prints_the_plan_and_creates_nothing(write_sweep, cli, workdir):
    path = write_sweep(SWEEP.replace("seeds: [0]", "seeds: [0, 1]"))
    result = cli("run", path, "--dry-run")
    assert result.code == 0, result.err
    assert listing(workdir) == ["sweep.yaml"]
    for arm in ("baseline-s0", "baseline-s1", "lr-high-s0", "lr-high-s1"):
        assert arm in result.out
    assert "optimizer.lr: 0.001 → 0.003" in result.out
    assert "debug: in this process" in result.out
    assert "dry run: nothing created, nothing submitted" in result.out


def test_slurm_dry_run_shows_the_real_sbatch_file_off_the_cluster(write_sweep, cli, workdir, monkeypatch):
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no srun: we are not on a cluster
    path = write_sweep(
        SWEEP.replace("launcher: {executor: debug}\n", SLURM).replace("seeds: [0]", "seeds: [0, 1, 2]")
    )
    result = cli("run", path, "--dry-run")
    assert result.code == 0, result.err
    assert listing(workdir) == ["sweep.yaml"]
    for line in ("#SBATCH --array=0-5%1", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --job-name=t", "#SBATCH --signal=USR2@90"):  # fmt: skip
        assert line in result.out
    run = cli("run", path)  # the real thing needs srun, and says so before creating anything
    assert run.code == 2 and "needs `srun` on PATH" in run.err
    assert listing(workdir) == ["sweep.yaml"]


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_dry_runs_offline(path, cli, workdir, monkeypatch):
    """The sweeps users start from (sweeps/*.yaml) validate whole, every arm, with no network or weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # off the cluster: the sbatch file is shown
    result = cli("run", path, "--dry-run")
    assert result.code == 0, result.err
    assert listing(workdir) == []
    sweep = yaml.safe_load(path.read_text())
    arms = [f"{arm}-s{seed}" for arm in ["baseline", *sweep["deltas"]] for seed in sweep["seeds"]]
    shown = {line.split("│")[1].strip() for line in result.out.splitlines() if line.startswith("│")}
    assert set(arms) <= shown
    assert "dry run: nothing created, nothing submitted" in result.out


STUDY_REFERENCE = "/shared/data/prx-eval-reference.parquet"


@pytest.mark.parametrize("name", ["prx.yaml", "prx-pixel-1024.yaml"])
def test_the_study_sweeps_score_on_reference_photos_and_refuse_a_missing_set_before_submitting(
    name, cli, workdir, monkeypatch
):
    """The study's protocol: prompts, noise and real images from photos with their own captions, at a path the
    user supplies. Missing there: one line naming the sweep file, the key and what is expected, exit 2, before
    anything is created or submitted (on a SLURM login node as off it); present: the sweep validates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = (SWEEPS / name).read_text()
    reference = yaml.safe_load(text)["baseline"]["eval"]["reference"]
    assert reference == {
        "kind": "parquet",
        "path": STUDY_REFERENCE,
        "image_column": "image",
        "caption": "caption_llm_s",
    }
    photos = workdir / "photos" / "eval.parquet"  # a folder this machine has: the path is checked
    path = workdir / name
    path.write_text(text.replace(STUDY_REFERENCE, str(photos)))
    line = next(n for n, ln in enumerate(text.splitlines(), 1) if STUDY_REFERENCE in ln)
    bin_dir = workdir / "bin"  # an `srun` on PATH, as on a login node (nothing gets as far as calling it)
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for args in (["--dry-run"], []):
        result = cli("run", path, *args)
        assert result.code == 2 and len(result.err.splitlines()) == 1, result.err
        assert result.err.startswith(
            f"error: {path}:{line}: baseline.eval.reference.path: arm baseline-s0: reference parquet file or folder {photos} "
            "does not exist; nothing submitted; expected eval.reference.path naming photos with their own "
            "captions that exist"
        ), result.err
        assert "or eval.reference: null to score on the held-out rows" in result.err
        assert listing(workdir) == ["bin", "bin/srun", name]
    photos.parent.mkdir()
    pq.write_table(pa.table({"image": [b"\x89PNG"], "caption_llm_s": ["a lighthouse at dusk"]}), photos)
    result = cli("run", path, "--dry-run")
    assert result.code == 0, result.err
    assert "dry run: nothing created, nothing submitted" in result.out


@pytest.mark.parametrize(
    ("preset", "delay", "warned"), [("prx-1.2b", 30, True), ("prx-1.2b", 120, False), ("tiny", 30, False)]
)
def test_run_warns_in_one_line_when_a_save_would_not_fit_between_the_stop_signal_and_the_kill(
    write_sweep, cli, workdir, preset, delay, warned
):
    """PRX-1.2B with AdamW: 14 GB, written twice (a save in flight, the stop's) at the assumed 0.5 GB/s."""
    from ablate.running.stopcheck import WRITE_BYTES_PER_S
    from trainer.config import TrainConfig
    from trainer.runtime.async_save import state_bytes

    text = SWEEP.replace("{preset: tiny}", f"{{preset: {preset}}}")
    path = write_sweep(
        text.replace("launcher: {executor: debug}", f"launcher: {{executor: local, signal_delay_s: {delay}}}")
    )
    result = cli("run", path, "--dry-run")
    assert result.code == 0, result.err
    warnings = [line for line in result.out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == warned
    if warned:
        cfg = TrainConfig.model_validate(yaml.safe_load(text)["baseline"])
        needed = 2 * state_bytes(cfg).total / WRITE_BYTES_PER_S
        assert warnings[0].startswith(
            f"warning: arm baseline-s0 may need {needed:.0f} s to save after a stop signal"
        )
        assert f"launcher.signal_delay_s {delay}" in warnings[0] and "(2 of 2 arms)" in warnings[0]


@pytest.mark.parametrize(("parallel", "warned"), [("ddp", True), ("fsdp", False)])
def test_a_sharded_arms_stop_time_save_is_written_by_every_process_at_once(
    write_sweep, cli, parallel, warned
):
    """PRX-1.2B on 4 processes at a 40 s delay: 2 × 14 GB from one writer (56 s) does not fit, while
    FSDP's sharded checkpoint (a quarter per process, written in parallel) does."""
    text = SWEEP.replace("{preset: tiny}", "{preset: prx-1.2b}").replace(
        "  log: {every: 1}\n", f"  log: {{every: 1}}\n  parallel: {{kind: {parallel}}}\n"
    )
    launcher = "launcher: {executor: local, signal_delay_s: 40, tasks_per_node: 4}"
    result = cli("run", write_sweep(text.replace("launcher: {executor: debug}", launcher)), "--dry-run")
    assert result.code == 0, result.err
    assert (
        any(line.startswith("warning: arm baseline-s0 may need") for line in result.out.splitlines())
        == warned
    )


def test_dry_run_shows_what_a_real_run_would_skip_or_block(write_sweep, cli, workdir):
    path = write_sweep()
    assert cli("run", path, "--dry-run").code == 0
    root = workdir / "runs" / "t"
    SweepDir(root).write_mark("t")  # the folder as `ablate run` made it
    write_json(root / "baseline-s0" / "spec.json", {"hash": "000000000000"})
    write_json(root / "baseline-s0" / "status.json", {"state": "done"})
    write_json(root / "baseline-s0" / "result.json", {})
    before = listing(workdir)
    result = cli("run", path, "--dry-run")
    assert result.code == 0 and listing(workdir) == before
    assert "blocked" in result.out and "--rerun NAME" in result.out
    assert "rerun" in cli("run", path, "--dry-run", "--rerun", "baseline-s0").out


def test_unknown_rerun_name_creates_nothing(write_sweep, cli, workdir):
    result = cli("run", write_sweep(), "--rerun", "lr-hihg-s0")
    assert (
        result.code == 2 and "--rerun: no arm named 'lr-hihg-s0' (did you mean 'lr-high-s0'?)" in result.err
    )
    assert listing(workdir) == ["sweep.yaml"]


def test_no_wait_is_refused_for_the_debug_executor(write_sweep, cli, workdir):
    result = cli("run", write_sweep(), "--no-wait")
    assert result.code == 2 and "debug executor" in result.err
    assert listing(workdir) == ["sweep.yaml"]


def test_status_lists_every_arm(write_sweep, cli, workdir):
    path = write_sweep(SWEEP.replace("seeds: [0]", "seeds: [0, 1]"))
    root = workdir / "runs" / "t"
    write_json(root / "baseline-s0" / "spec.json", {"hash": "x"})
    write_json(root / "baseline-s0" / "status.json", {"state": "failed", "step": 3, "total_steps": 4, "loss": 1.23456,
                                                      "error": "FloatingPointError: loss is nan"})  # fmt: skip
    result = cli("status", path)
    assert result.code == 0
    rows = {line.split("│")[1].strip(): line for line in result.out.splitlines() if line.startswith("│")}
    rows.pop("", None)  # continuation lines of folded cells
    assert set(rows) == {"baseline-s0", "baseline-s1", "lr-high-s0", "lr-high-s1"}
    assert "failed" in rows["baseline-s0"] and "3/4" in rows["baseline-s0"] and "1.235" in rows["baseline-s0"]
    assert "missing" in rows["lr-high-s1"]
    assert "loss is nan" in result.out


def test_help_status_and_rank_do_not_import_torch(write_sweep, workdir):
    path = write_sweep()
    write_json(workdir / "runs" / "t" / "baseline-s0" / "spec.json", {"hash": "x"})
    probe = (
        "import sys\n"
        "from ablate.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'trainer.config') if m in sys.modules)\n"
        "print('HEAVY', json.dumps(heavy))\n"
    )
    for args in (
        ["--help"],
        ["status", str(path)],
        ["rank", str(path)],
        ["rank", str(path), "--format", "json"],
    ):
        out = subprocess.run(
            [sys.executable, "-c", "import json\n" + probe, *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=workdir,
        ).stdout
        assert out.splitlines()[-1] == "HEAVY []", (args, out)


def test_console_script_exit_code_and_single_line(write_sweep, workdir):
    path = write_sweep(SWEEP.replace("seeds: [0]", "seed: [0]"))
    script = Path(sys.executable).with_name("ablate")
    proc = subprocess.run([str(script), "run", str(path)], capture_output=True, text=True, cwd=workdir)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {path}:16: seed: unknown key")
    assert json.dumps(listing(workdir)) == json.dumps(["sweep.yaml"])


def test_ctrl_c_while_following_arms_exits_cleanly(write_sweep, cli, workdir, monkeypatch):
    from ablate.running import jobs

    def interrupted(submitted, poll_s):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "wait", interrupted)
    result = cli("run", write_sweep())
    assert result.code == 130 and "Traceback" not in result.err
    assert "interrupted: arms running on this machine stop with it" in result.out
    assert "resubmits unfinished arms" in result.out


def test_inert_escapes_every_control_character_and_keeps_newlines_only_when_asked():
    from ablate.shown import inert

    assert inert("a\x1b[2Jb\x9b1m\x7f\r\t\x00") == "a\\x1b[2Jb\\x9b1m\\x7f\\r\\t\\x00"
    assert inert("a\nb") == "a\\nb" and inert("a\nb", lines=True) == "a\nb"
    assert inert("\udcff\u202e") == "\\udcff\\u202e"  # an undecodable byte of a path; a bidi override
    assert inert("café → ✓ [bold]x[/bold] :smile:") == "café → ✓ [bold]x[/bold] :smile:"
