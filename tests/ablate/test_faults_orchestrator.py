"""Fault injection on the orchestrator's side: each fault really made, each answered with one line.

Hostile sweep files (a real billion laughs, a NUL byte, deep nesting, a 5,000-digit integer, a 300-character
name), an output_dir that is a file or a user's own folder, links planted in a run folder, garbage records in
one arm, a sweep edited after its arms ran, a trainer holding its run folder's writer lock in another process,
a full and a read-only file system (a real tmpfs), a missing data file and column. Each case checks the one
line (file, arm or path named), the exit code, and that nothing was submitted or lost.

`ablate run` goes through its real path up to the executor; `jobs.submit` is replaced by a recorder so no
arm trains (training is not the point here: the trainer's faults are tests/trainer's).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from ablate_testing import SWEEP, write_json

from ablate.sweep.expand import expand
from ablate.sweep.schema import load_sweep

REPO = Path(__file__).resolve().parents[2]
DEAD_PID = 2**30  # above any pid_max: never a live process


def replace(old: str, new: str, text: str = SWEEP) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def one_line(result, path: Path | None = None) -> str:
    """The error contract: exit 2, one line on stderr, no traceback; returns the line."""
    assert result.code == 2, result
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err + result.out
    if path is not None:
        assert lines[0].startswith(f"error: {path}:"), lines[0]
    return lines[0]


def squash(text: str) -> str:
    """Text without white space and table borders: a phrase folded over lines of a table cell still matches."""
    return re.sub(r"[\s│┃]", "", text)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def submitted(monkeypatch):
    """Replace submission by a recorder: the run folders `ablate run` would have handed the executor."""
    from ablate.running import jobs

    sent: list[str] = []

    def record(executor, run_dirs, **kwargs):
        sent.extend(Path(d).name for d in run_dirs)
        return []

    monkeypatch.setattr(jobs, "submit", record)
    return sent


def specs_of(path: Path) -> dict[str, object]:
    return {s.name: s for s in expand(load_sweep(path))}


def ran(root: Path, spec, state: str = "done", *, metrics: dict | None = None, legacy: bool = False) -> Path:
    """An arm's run folder as a finished training leaves it (records only, nothing trained)."""
    run_dir = root / spec.name
    record = spec.record("t").to_json()
    if legacy:  # written before settings_hash existed
        record.pop("settings_hash", None)
    write_json(run_dir / "spec.json", record)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(spec.config, sort_keys=False))
    write_json(run_dir / "status.json", {"state": state, "step": 4, "total_steps": 4, "loss": 0.5})
    write_json(run_dir / "job.json", {"executor": "debug", "job_id": "1", "host": socket.gethostname()})
    if state == "done":
        for step in (2, 4):
            write_json(
                run_dir / "eval" / f"step_{step}.json",
                {"step": step, "metrics": metrics or {"val_loss": 0.3}},
            )
        write_json(run_dir / "result.json", {"step": 4, "throughput": {"batches_per_s": 5.0}})
    return run_dir


# --- hostile sweep files ---------------------------------------------------------------------------------


def billion_laughs() -> str:
    """The classic: ten lists of ten aliases of the list before, 10^9 strings once expanded, ~1.2 KB."""
    lines = ["name: t", 'lol0: &lol0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"lol{i}: &lol{i} [" + ",".join([f"*lol{i - 1}"] * 10) + "]")
    lines.append("baseline: *lol9")
    return "\n".join(lines) + "\n"


def test_billion_laughs_fails_in_milliseconds_with_bounded_memory(write_sweep, cli, workdir):
    text = billion_laughs()
    assert len(text) < 1300  # smaller than the 1.2 KB one of the issue
    path = write_sweep(text)
    for command in (["status"], ["rank"], ["run", "--dry-run"], ["report"]):
        tracemalloc.start()
        start = time.perf_counter()
        result = cli(*command, path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        line = one_line(result, path)
        assert re.match(
            rf"error: {re.escape(str(path))}:\d+: aliases expand this value to [\d,]+ values", line
        )
        assert "billion laughs" in line
        assert elapsed < 2.0, (command, elapsed)
        assert peak < 200 * 2**20, (command, peak)
    assert listing(workdir) == ["sweep.yaml"]


HOSTILE = {
    "nul-byte": (
        replace("  tokenizer: {kind: pixel}\n", "  tokenizer: {kind: pi\0xel}\n").encode(),
        6,
        "a NUL byte",
    ),
    "control-char": (replace("name: t", "name: t\x1b[2J").encode(), 1, "control character U+001B"),
    "not-utf8": (replace("name: t", "name: caf\xe9").encode("latin-1"), 1, "not UTF-8 text (byte 0xe9"),
    "deep-flow": (
        (SWEEP + "x: " + "[" * 5000 + "]" * 5000 + "\n").encode(),
        18,
        "nested more than 64 levels",
    ),
    "deep-block": (
        (SWEEP + "".join(f"{'  ' * i}k{i}:\n" for i in range(100)) + "  " * 100 + "v: 1\n").encode(),
        18 + 63,
        "nested more than 64 levels",
    ),
    "5000-digit-int": (
        replace("seeds: [0]", "seeds: [" + "7" * 5000 + "]").encode(),
        16,
        "an integer of 5,000 digits",
    ),
    "recursive-alias": ((SWEEP + "x: &a [1, *a]\n").encode(), 18, "alias *a inside its own anchor"),
    "too-many-aliases": (
        (SWEEP + "a: &a 1\nb: [" + ",".join(["*a"] * 101) + "]\n").encode(),
        19,
        "more than 100 aliases",
    ),
    "bad-date": (
        replace("seeds: [0]", "seeds: [2020-13-45]").encode(),
        16,
        "cannot read '2020-13-45' as a timestamp",
    ),
    "huge-file": ((SWEEP + "#" * (2 << 20) + "\n").encode(), None, "larger than 1024 KiB"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_whatever_bytes_the_sweep_file_holds_every_command_says_one_line(write_sweep, cli, workdir, case):
    data, line, fragment = HOSTILE[case]
    path = workdir / "sweep.yaml"
    path.write_bytes(data)
    for command in (["run", "--dry-run"], ["run"], ["status"], ["rank"], ["cancel"]):
        got = one_line(cli(*command, path), path)
        where = f"error: {path}:{line}: " if line is not None else f"error: {path}: "
        assert got.startswith(where) and fragment in got, (command, got)
    assert listing(workdir) == ["sweep.yaml"]


@pytest.mark.parametrize(
    "old,new,lineno,key",
    [
        ("name: t", "name: " + "n" * 300, 1, "name"),
        ("  lr-high:", "  " + "d" * 300 + ":", 14, "deltas." + "d" * 57 + "..."),
    ],
)
def test_a_300_character_name_is_refused(write_sweep, cli, workdir, old, new, lineno, key):
    path = write_sweep(replace(old, new))
    line = one_line(cli("run", path), path)
    assert (
        line.startswith(f"error: {path}:{lineno}: {key}: ")
        and "at most 100 characters (it names a folder)" in line
    )
    assert len(line) < 400
    assert listing(workdir) == ["sweep.yaml"]


def test_output_dir_that_is_a_file(write_sweep, cli, workdir):
    (workdir / "results").write_text("my numbers\n")
    path = write_sweep("name: t\noutput_dir: results\n" + SWEEP.split("\n", 1)[1])
    for command in (["run"], ["status"], ["rank"]):
        line = one_line(cli(*command, path), path)
        assert line == (
            f"error: {path}:2: output_dir: the output folder {workdir / 'results'} is a file, not a folder; "
            "expected a folder, or a path that does not exist yet"
        )
    assert (workdir / "results").read_text() == "my numbers\n"


# --- ownership of the sweep folder ------------------------------------------------------------------------


def test_a_users_own_folder_is_never_written(write_sweep, cli, workdir, submitted):
    mine = workdir / "experiments"
    mine.mkdir()
    (mine / "config.yaml").write_text("lr: 0.1  # my own\n")
    path = write_sweep("name: t\noutput_dir: experiments\n" + SWEEP.split("\n", 1)[1])
    for command in (["run"], ["run", "--dry-run"], ["report"]):
        line = one_line(cli(*command, path), path)
        assert line.startswith(
            f"error: {path}:2: output_dir: the output folder {mine} was not made by ablate "
        )
        assert "(it holds config.yaml); nothing written" in line
    assert (mine / "config.yaml").read_text() == "lr: 0.1  # my own\n"
    assert listing(mine) == ["config.yaml"] and submitted == []


def test_a_sweep_folder_from_before_markers_is_adopted_and_another_sweeps_refused(
    write_sweep, cli, workdir, submitted
):
    path = write_sweep()
    root = workdir / "runs" / "t"
    ran(root, specs_of(path)["baseline-s0"])
    (root / ".submitit").mkdir()
    assert cli("run", path).code == 0
    assert json.loads((root / ".ablate-sweep").read_text())["sweep"] == "t"
    assert submitted == ["lr-high-s0"]
    other = write_sweep(replace("name: t", "name: u\noutput_dir: runs/t"), "other.yaml")
    line = one_line(cli("run", other), other)
    assert "output_dir: the output folder" in line and "belongs to sweep 't'" in line
    assert submitted == ["lr-high-s0"]


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what must come out of a refused command unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_of_names_ablate_also_uses_is_not_adopted(write_sweep, cli, workdir, submitted):
    mine = workdir / "paper"
    (mine / "figures").mkdir(parents=True)
    (mine / "wandb").mkdir()
    (mine / "report.html").write_text("<h1>my own report</h1>\n")
    (mine / "figures" / "impact.png").write_bytes(b"\x89PNG\r\n\x1a\nmy own figure")
    (mine / "wandb" / "settings").write_text("[default]\n")
    before = contents(mine)
    path = write_sweep("name: t\noutput_dir: paper\n" + SWEEP.split("\n", 1)[1])
    for command in (
        ["report"],
        ["plot"],
        ["run"],
        ["run", "--dry-run"],
        ["cancel"],
        ["sync"],
        ["rank", "--wandb"],
    ):
        line = one_line(cli(*command, path), path)
        assert line.startswith(
            f"error: {path}:2: output_dir: the output folder {mine} was not made by ablate "
            "(it holds figures, report.html, wandb); nothing written; expected an output_dir of the sweep's own"
        ), (command, line)
    assert contents(mine) == before and not (mine / ".ablate-sweep").exists() and submitted == []


def test_a_folder_holding_status_records_is_not_adopted_without_this_sweeps_spec(
    write_sweep, cli, workdir, submitted
):
    path = write_sweep()
    root = workdir / "runs" / "t"
    write_json(root / "baseline-s0" / "status.json", {"state": "done"})  # the shape of a run folder
    write_json(root / "notes" / "status.json", {"state": "my own"})
    specs = specs_of(path)
    other = root / "lr-high-s0"
    write_json(other / "spec.json", specs["lr-high-s0"].record("u").to_json())  # another sweep's arm
    before = contents(root)
    for command in (["run"], ["report"], ["plot"]):
        line = one_line(cli(*command, path), path)
        assert f"the output folder {root} was not made by ablate (it holds " in line, (command, line)
    assert contents(root) == before and submitted == []

    # A folder from before markers is still adopted: its run folders' spec.json say they are this sweep's.
    write_json(other / "spec.json", specs["lr-high-s0"].record("t").to_json())
    (root / "notes" / "status.json").unlink()
    (root / "notes").rmdir()
    assert cli("run", path).code == 0
    assert json.loads((root / ".ablate-sweep").read_text())["sweep"] == "t"


def _mark(args: tuple[str, str, object]) -> str | None:
    folder, sweep, start = args
    from core.sweepdir import SweepDir

    start.wait()  # every process marks at once
    return SweepDir(folder).write_mark(sweep).sweep


def test_a_marker_is_created_never_replaced_when_two_sweeps_mark_one_folder_at_once(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    start = ctx.Manager().Event()
    names = [f"sweep{i}" for i in range(8)]
    with ctx.Pool(len(names)) as pool:
        pending = pool.map_async(_mark, [(str(tmp_path), name, start) for name in names])
        start.set()
        seen = pending.get(timeout=60)
    winner = json.loads((tmp_path / ".ablate-sweep").read_text())["sweep"]
    assert winner in names and seen == [winner] * len(names)  # each process sees the one marker made
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ablate-sweep"]  # no temporary file left


def test_links_planted_in_a_run_folder_are_replaced_never_followed(
    write_sweep, cli, workdir, tmp_path_factory, submitted
):
    path = write_sweep()
    root = workdir / "runs" / "t"
    specs = specs_of(path)
    outside = tmp_path_factory.mktemp("outside")
    status, job = outside / "status.json", outside / "job.json"
    status.write_text('{"state": "failed", "error": "boom"}')
    job.write_text('{"executor": "debug", "job_id": "7"}')
    run_dir = ran(root, specs["lr-high-s0"], "failed")
    for name, target in (("status.json", status), ("job.json", job)):
        (run_dir / name).unlink()
        (run_dir / name).symlink_to(target)
    # and a whole run folder that is a link to a folder elsewhere
    elsewhere = outside / "elsewhere"
    elsewhere.mkdir()
    root.mkdir(parents=True, exist_ok=True)
    (root / "baseline-s0").symlink_to(elsewhere, target_is_directory=True)

    status_out = cli("status", path)
    assert status_out.code == 0 and "symbolic link" in status_out.out
    result = cli("run", path)
    assert result.code == 0, result
    assert submitted == ["lr-high-s0"]  # the linked folder is skipped: `--rerun baseline-s0` moves it aside
    assert squash("`--rerun baseline-s0` starts it afresh") in squash(result.out)
    assert status.read_text() == '{"state": "failed", "error": "boom"}'
    assert job.read_text() == '{"executor": "debug", "job_id": "7"}'
    for name in ("status.json", "job.json"):
        assert not (run_dir / name).is_symlink() and (run_dir / name).is_file()
    assert os.listdir(elsewhere) == []

    assert cli("run", path, "--rerun", "baseline-s0").code == 0
    assert submitted == ["lr-high-s0", "baseline-s0"]
    assert (root / "baseline-s0").is_dir() and not (root / "baseline-s0").is_symlink()
    assert os.listdir(elsewhere) == []  # the link itself went to .replaced/, its target untouched
    (kept,) = (root / ".replaced").iterdir()
    assert kept.is_symlink()


def test_what_would_fail_inside_the_job_is_found_before_submission(
    write_sweep, cli, workdir, tmp_path_factory, submitted
):
    """A link planted where only the trainer writes (log.jsonl), and a config.yaml the trainer's schema
    refuses where the job reads it as recorded (`ablate eval`, a re-score): refused per arm, not submitted."""
    path = write_sweep()
    root = workdir / "runs" / "t"
    specs = specs_of(path)
    outside = tmp_path_factory.mktemp("outside") / "log.jsonl"
    outside.write_text("")
    failed = ran(root, specs["baseline-s0"], "failed")
    (failed / "log.jsonl").symlink_to(outside)
    done = ran(root, specs["lr-high-s0"])
    config = yaml.safe_load((done / "config.yaml").read_text())
    config["train"]["num_workers"] = -1  # how it ran: `ablate run` keeps it for a re-score
    (done / "config.yaml").write_text(yaml.safe_dump(config))
    for run_dir in (failed, done):
        (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)

    linked = squash(f"{failed}: log.jsonl is a symbolic link; ablate writes nothing through a link")
    for command in (["run", "--dry-run"], ["run"]):
        result = cli(*command, path)
        assert result.code == 0 and linked in squash(result.out), result.out
        assert squash("`--rerun baseline-s0` starts it afresh") in squash(result.out)
    line = one_line(cli("eval", path, "--arm", "baseline-s0"))
    assert line.startswith("error: --arm: arm 'baseline-s0': ") and "log.jsonl is a symbolic link" in line
    line = one_line(cli("eval", path, "--arm", "lr-high-s0"))
    assert (
        f"{done / 'config.yaml'}: not a config the trainer reads: train.num_workers: Input should be" in line
    )
    write_sweep(replace("eval: {every: 2, batch_size: 8}", "eval: {every: 2, batch_size: 4}"))  # a re-score
    result = cli("run", path)
    assert result.code == 0 and squash(f"{done / 'config.yaml'}: not a config the trainer reads") in squash(
        result.out
    )
    assert submitted == [] and outside.read_text() == ""

    assert cli("run", path, "--rerun", "baseline-s0").code == 0 and submitted == ["baseline-s0"]
    assert not (failed / "log.jsonl").exists() and outside.read_text() == ""  # moved aside, not followed


SWEEP_LINKS = {  # where ablate writes in a sweep folder → what a link planted there points at
    ".eval-cache": "folder",
    "figures": "folder",
    ".code": "folder",
    ".submitit": "folder",
    ".replaced": "folder",
    "report.html": "file",
    "figures/impact.png": "file",
    ".eval-cache/reference.lock": "file",
    ".submitit/123": "folder",
}


@pytest.mark.parametrize("where", list(SWEEP_LINKS))
def test_a_link_planted_where_ablate_writes_in_the_sweep_folder_is_refused(
    write_sweep, cli, workdir, tmp_path_factory, submitted, where
):
    from core.sweepdir import SweepDir

    path = write_sweep(replace("seeds: [0]", "seeds: [0, 1]"))
    root = workdir / "runs" / "t"
    SweepDir(root).write_mark("t")
    specs = specs_of(path)
    for name in ("baseline-s0", "lr-high-s0"):  # two more arms to submit, two done to report on
        ran(root, specs[name])
    outside = tmp_path_factory.mktemp("outside")
    target = outside / "target"
    if SWEEP_LINKS[where] == "folder":
        target.mkdir()
        (target / "mine.txt").write_text("the user's own\n")
    else:
        target.write_bytes(b"\x89PNG the user's own")
    (root / where).parent.mkdir(parents=True, exist_ok=True)
    (root / where).symlink_to(target)
    before = contents(outside)
    for command in (["run"], ["report"], ["plot"], ["cancel"], ["rank", "--wandb"], ["sync"]):
        line = one_line(cli(*command, path), path)
        assert line.startswith(
            f"error: {path}:1: name: {root}: {where} is a symbolic link; "
            "ablate writes nothing through a link in a sweep folder (remove it"
        ), (command, line)
    assert contents(outside) == before and sorted(os.listdir(outside)) == ["target"] and submitted == []
    (root / where).unlink()
    assert cli("run", path).code == 0 and submitted == ["baseline-s1", "lr-high-s1"]


def test_the_link_submitit_leaves_after_a_slurm_submission_is_not_taken_for_a_planted_one(tmp_path):
    from submitit.core.utils import JobPaths

    from core.sweepdir import SweepDir

    folder = SweepDir(tmp_path).job_folder
    folder.parent.mkdir()
    sbatch = folder.parent / ".submission_file_0a1b.sh"  # what submitit writes, then moves and links
    sbatch.write_text("#!/bin/bash\n")
    JobPaths(folder, "17").move_temporary_file(sbatch, "submission_file", keep_as_symlink=True)
    assert sbatch.is_symlink() and SweepDir(tmp_path).planted_links() == []
    outside = tmp_path.parent / f"{tmp_path.name}-outside.sh"
    outside.write_text("mine\n")
    (folder.parent / ".submission_file_2c3d.sh").symlink_to(outside)  # the same name, pointing elsewhere
    assert SweepDir(tmp_path).planted_links() == [".submitit/.submission_file_2c3d.sh"]


def test_a_cache_inside_the_sweep_folder_is_written_through_no_link(
    write_sweep, cli, workdir, tmp_path_factory
):
    from core.sweepdir import SweepDir

    root = workdir / "runs" / "t"
    path = write_sweep(
        replace("  log: {every: 1}", f"  log: {{every: 1}}\n  cache: {{dir: {root / 'cache'}}}")
    )
    SweepDir(root).write_mark("t")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (root / "cache").symlink_to(elsewhere, target_is_directory=True)
    line = one_line(cli("cache", path), path)
    assert f"{root / 'cache'} is a symbolic link in the sweep's output folder" in line
    assert os.listdir(elsewhere) == []


# --- one garbage record marks one arm ----------------------------------------------------------------------


GARBAGE = {
    "status.json": (lambda d: (d / "status.json").write_bytes(b"\x00" * 32), "status.json: unreadable"),
    "spec.json": (lambda d: (d / "spec.json").write_text("[1, 2]"), "spec.json: unreadable (a JSON list"),
    "job.json": (
        lambda d: write_json(d / "job.json", {"job_id": [1]}),
        "job.json: unreadable (field 'job_id'",
    ),
    "status-type": (
        lambda d: write_json(d / "status.json", {"state": "done", "loss": "low"}),
        "field 'loss'",
    ),
    "eval-step": (
        lambda d: (d / "eval" / "step_4.json").write_text('{"metrics": "x"'),
        "step_4.json: unreadable",
    ),
    "result.json": (
        lambda d: write_json(d / "result.json", {"throughput": "fast"}),
        "result.json: unreadable",
    ),
    "config.yaml": (
        lambda d: (
            write_json(d / "spec.json", {"name": "lr-high-s0", "hash": "0"}),  # from before hash versions
            (d / "config.yaml").write_text(billion_laughs()),
        ),
        "config.yaml: unreadable (line 6: aliases expand",
    ),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_one_garbage_record_marks_only_its_arm_unreadable(write_sweep, cli, workdir, submitted, case):
    spoil, fragment = GARBAGE[case]
    path = write_sweep(replace("seeds: [0]", "seeds: [0, 1]"))
    root = workdir / "runs" / "t"
    specs = specs_of(path)
    for name in ("baseline-s0", "baseline-s1", "lr-high-s0", "lr-high-s1"):
        ran(root, specs[name], metrics={"val_loss": 0.3 if name.startswith("baseline") else 0.25})
    spoil(root / "lr-high-s0")

    status = cli("status", path)
    assert status.code == 0 and "Traceback" not in status.err
    row = next(line for line in status.out.splitlines() if "lr-high-s0" in line)
    if case == "eval-step":  # status reads no metrics: rank and report name the file
        assert "done" in row
    else:
        assert "unreadable" in row
        assert f"lr-high-s0 is unreadable: {root / 'lr-high-s0'}" in status.out and fragment in status.out
        assert sum("done" in line for line in status.out.splitlines()) == 3

    rank = cli("rank", path, "--format", "json")
    assert rank.code == 0, rank
    rows = {r["delta"]: r for r in json.loads(rank.out)["rows"]}
    assert rows["lr-high"]["val_loss_pairs"] == 1 and rows["lr-high"]["val_loss_change"] == pytest.approx(
        -0.05
    )
    assert "1 unreadable" in rows["lr-high"]["state"]
    assert re.search(r"unreadable: lr-high-s0: .*" + re.escape(fragment.split(":")[0]), rank.err)

    result = cli("run", path)
    assert result.code == 0, result
    assert submitted == []
    if (
        case != "eval-step"
    ):  # a garbled metric record leaves a finished arm finished (`ablate eval` rewrites it)
        assert squash("`--rerun lr-high-s0` starts it afresh") in squash(result.out)


def test_an_unreadable_arm_moved_aside_is_named_so(write_sweep, cli, workdir, submitted):
    path = write_sweep()
    root = workdir / "runs" / "t"
    specs = specs_of(path)
    ran(root, specs["baseline-s0"])
    ran(root, specs["lr-high-s0"], "failed")
    (root / "lr-high-s0" / "spec.json").write_bytes(b"\x00" * 16)
    assert cli("run", path, "--rerun", "lr-high-s0").code == 0 and submitted == ["lr-high-s0"]
    (kept,) = (root / ".replaced").iterdir()
    assert re.fullmatch(r"lr-high-s0-unreadable-\d{8}T\d{6}", kept.name), kept.name
    assert (kept / "spec.json").read_bytes() == b"\x00" * 16


def test_report_and_plot_work_around_a_garbage_arm(write_sweep, cli, workdir):
    path = write_sweep()
    root = workdir / "runs" / "t"
    specs = specs_of(path)
    ran(root, specs["baseline-s0"])
    ran(root, specs["lr-high-s0"])
    (root / "lr-high-s0" / "eval" / "step_4.json").write_text("[")
    report = cli("report", path)
    assert report.code == 0, report
    page = (root / "report.html").read_text()
    assert "unreadable" in page and "step_4.json" in page


# --- text a record or a path holds, shown inert -------------------------------------------------------------

ESCAPES = "\x1b[2J\x1b]0;pwned\x07 [bold]b[/bold] :smile:"  # clear the screen, retitle the window; markup
ESCAPED = "\\x1b[2J\\x1b]0;pwned\\x07 [bold]b[/bold] :smile:"  # what a reader sees instead


def test_control_sequences_in_records_and_paths_are_shown_escaped(write_sweep, cli, workdir):
    """An error note, a log tail and the sweep's folder (in every path) holding ESC sequences: status,
    run --dry-run, rank, report and an error line show them escaped; the raw bytes never reach the terminal
    or the page."""
    path = write_sweep(SWEEP + 'output_dir: "out\\e]0;pwned\\a"\n')
    root = workdir / "out\x1b]0;pwned\x07"
    specs = specs_of(path)
    run_dir = ran(root, specs["baseline-s0"], "failed")
    log = run_dir / "stderr.log"
    log.write_text(f"Traceback (most recent call last):\nValueError: {ESCAPES}\n")
    write_json(
        run_dir / "status.json", {"state": "failed", "step": 2, "total_steps": 4, "error": f"boom {ESCAPES}"}
    )
    write_json(run_dir / "job.json", {"executor": "debug", "job_id": "1", "stderr": str(log)})
    (ran(root, specs["lr-high-s0"]) / "result.json").write_text("[")  # unreadable: its note names its path

    def shown(*command: str) -> str:
        result = cli(*command, path)
        assert result.code == 0, result
        printed = result.out + result.err
        assert "\x1b" not in printed and "\x07" not in printed, printed
        assert "out\\x1b]0;pwned\\x07" in squash(printed)  # the sweep's folder, escaped
        return squash(printed)

    status = shown("status")
    assert (
        squash(f"boom {ESCAPED}") in status and squash(f"│ ValueError: {ESCAPED}") in status
    )  # note, log tail
    assert squash(f"(failed: boom {ESCAPED})") in shown("run", "--dry-run")
    shown("rank")
    shown("report")
    page = (root / "report.html").read_text()
    assert "\x1b" not in page and "\x07" not in page and f"boom {ESCAPED}" in page

    write_sweep(
        parquet_sweep('"data/\\e[2J\\e]0;pwned\\a [bold]b[/bold] :smile:"', "c") + 'output_dir: "out"\n'
    )
    line = one_line(cli("run", "--dry-run", path), path)  # a data path
    assert "\x1b" not in line and f"parquet file or folder data/{ESCAPED} does not exist" in line


# --- config drift --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["settings-hash", "before-settings-hash"])
def test_rank_and_status_say_when_the_sweep_changed_since_an_arm_ran(write_sweep, cli, workdir, legacy):
    path = write_sweep()
    root = workdir / "runs" / "t"
    specs = specs_of(path)
    ran(root, specs["baseline-s0"], legacy=legacy)
    ran(root, specs["lr-high-s0"], metrics={"val_loss": 0.25}, legacy=legacy)
    assert "config changed" not in cli("status", path).out  # unchanged sweep: no false alarm
    assert "†" not in cli("rank", path).out

    write_sweep(replace("optimizer: {kind: adamw, lr: 1.0e-3}", "optimizer: {kind: adamw, lr: 2.0e-3}"))
    status = cli("status", path)
    assert status.code == 0
    assert "baseline-s0: config changed since it ran: optimizer.lr: 0.001 → 0.002\n" in status.out
    assert "config changed for 1 arm(s) since they ran" in status.out  # lr-high sets its own lr
    rank = cli("rank", path, "--format", "markdown")
    assert rank.code == 0
    assert "| baseline | done † |" in rank.out
    assert "† baseline-s0: config changed since it ran: optimizer.lr: 0.001 → 0.002" in rank.out
    assert "lr-high | done |" in rank.out  # still ranked

    write_sweep(replace("warmup_steps: 1, ", ""))  # a setting removed: its default applies now
    assert "baseline-s0: config changed since it ran: train.warmup_steps: 1 → 0\n" in cli("status", path).out
    write_sweep(replace("  checkpoint: {every: 2}\n", ""))  # how it runs: not drift
    assert "changed" not in " ".join(cli("status", path).out.split())


def test_a_default_written_out_or_an_execution_setting_is_not_drift(write_sweep, cli, workdir, submitted):
    """Drift is what `ablate run` compares, the resolved identity, not the sweep file's text."""
    path = write_sweep()
    root = workdir / "runs" / "t"
    for spec in specs_of(path).values():
        ran(root, spec)
    text = replace("  log: {every: 1}\n", "  log: {every: 1}\n  flow: {prediction: v}\n")  # the default
    text = replace("lr: 1.0e-3}", "lr: 1.0e-3, betas: [0.9, 0.95]}", text)  # the default too
    write_sweep(replace("threads: 1}", "threads: 1, num_workers: 2}", text))  # how it runs
    planned = cli("run", path, "--dry-run")
    assert planned.code == 0 and planned.out.count("│ skip ") == 2, planned.out  # `ablate run` keeps both
    status = cli("status", path)
    assert status.code == 0 and "changed" not in " ".join(status.out.split()), status.out
    rank = cli("rank", path, "--format", "markdown")
    assert rank.code == 0 and "†" not in rank.out + rank.err, rank.out
    assert cli("run", path).code == 0 and submitted == []

    write_sweep(replace("betas: [0.9, 0.95]", "betas: [0.8, 0.95]", text))  # what it trains
    status = cli("status", path)
    assert (
        "baseline-s0: config changed since it ran: optimizer.betas: [0.9, 0.95] → [0.8, 0.95]\n" in status.out
    )
    assert "| baseline | done † |" in cli("rank", path, "--format", "markdown").out
    write_sweep(replace("eval: {every: 2, batch_size: 8}", "eval: {every: 2, batch_size: 4}", text))  # scored
    status = " ".join(cli("status", path).out.split())
    assert "baseline-s0: evaluation settings changed since it was scored: eval.batch_size: 8 → 4" in status
    assert "evaluation settings changed for 2 arm(s) since they were scored" in status


# --- live writers ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def writer_in_another_process(run_dir: Path):
    """Hold the run folder's writer lock in a child process, as a trainer started by hand does."""
    code = (
        "import sys, time\n"
        "from core.lock import WriterLock\nfrom core.rundir import RunDir\n"
        "WriterLock(RunDir(sys.argv[1])).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        yield child.pid
    finally:
        child.kill()
        child.wait()


def test_a_trainer_started_by_hand_is_in_flight_and_never_submitted_twice(
    write_sweep, cli, workdir, submitted
):
    path = write_sweep()
    root = workdir / "runs" / "t"
    specs = specs_of(path)
    run_dir = ran(root, specs["baseline-s0"], "running")  # an earlier `ablate run`'s job, long gone ...
    write_json(
        run_dir / "job.json", {"executor": "local", "job_id": str(DEAD_PID), "host": socket.gethostname()}
    )
    write_json(run_dir / "status.json", {"state": "running", "pid": DEAD_PID, "host": socket.gethostname()})
    ran(root, specs["lr-high-s0"])

    with writer_in_another_process(run_dir) as pid:  # ... and a trainer started by hand since
        status = cli("status", path)
        row = next(line for line in status.out.splitlines() if "baseline-s0" in line)
        assert "running" in row and squash(f"process {pid} on {socket.gethostname()}") in squash(status.out)
        result = cli("run", path)
        assert result.code == 0, result
        assert submitted == []
        assert squash(f"in flight (running: process {pid} on {socket.gethostname()}") in squash(result.out)
        assert "stale" not in result.out
        refused = one_line(cli("eval", path, "--arm", "baseline-s0"))
        assert f"arm 'baseline-s0': in flight (process {pid}" in refused
        before = (run_dir / "status.json").read_bytes()
        cancelled = cli("cancel", path, "--arm", "baseline-s0")  # not ablate's job: says whose it is
        assert cancelled.code == 1 and f"not cancelled: process {pid} on" in cancelled.out
        assert f"stop that process (kill {pid} on {socket.gethostname()})" in cancelled.out
        assert (run_dir / "status.json").read_bytes() == before
    # the trainer is gone (and its job before it): the arm is resubmitted
    assert cli("run", path).code == 0 and submitted == ["baseline-s0"]


def test_rerun_of_an_arm_in_flight_is_not_done_and_exits_1_saying_why(write_sweep, cli, workdir, submitted):
    path = write_sweep()
    root = workdir / "runs" / "t"
    specs = specs_of(path)
    run_dir = ran(root, specs["baseline-s0"])
    ran(root, specs["lr-high-s0"])
    with writer_in_another_process(run_dir) as pid:  # a trainer writes it: `--rerun` cannot start it afresh
        result = cli("run", path, "--rerun", "baseline-s0")
    assert result.code == 1 and submitted == [] and "Traceback" not in result.err
    (line,) = result.err.splitlines()
    assert line.startswith(
        f"error: --rerun not done for baseline-s0: in flight (running: process {pid} on"
    ), line
    assert line.endswith("is writing it); stop that process before rerunning it"), line
    assert (run_dir / "result.json").exists()  # nothing moved aside


# --- operating faults --------------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path_factory):
    """A small real tmpfs, unmounted after; skips where this machine cannot mount one (not root)."""
    mnt = tmp_path_factory.mktemp("tmpfs")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write until the file system says it is full; returns the filler."""
    filler = folder / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as f:
        while True:
            f.write(b"\0" * (1 << 16))
            f.flush()
    return filler


def test_disk_full_is_one_line_and_leaves_nothing_that_blocks(write_sweep, cli, workdir, tmpfs, submitted):
    out = tmpfs / "runs"
    path = write_sweep(f"name: t\noutput_dir: {out}\n" + SWEEP.split("\n", 1)[1])
    specs_of(path)  # the trainer's schema imported before the disk fills
    filler = fill(tmpfs)
    line = one_line(cli("run", path))
    assert line.startswith(f"error: {out}")  # the path on the full disk
    assert "disk full; expected free space on that file system" in line and "nothing submitted" in line
    assert submitted == [] and not any(out.glob("*/spec.json")) and not list(out.rglob("*.tmp"))
    filler.unlink()
    assert cli("run", path).code == 0 and submitted == ["baseline-s0", "lr-high-s0"]

    # The jobs ended badly; the disk is full again when `ablate run` resubmits them: the run folders stay as
    # they were (failed, resubmitted once there is room), nothing is submitted.
    for arm in ("baseline-s0", "lr-high-s0"):
        write_json(out / arm / "status.json", {"state": "failed", "error": "boom"})
    filler = fill(tmpfs)
    line = one_line(cli("run", path))
    assert (
        line.startswith(f"error: {out}/")
        and "cannot prepare the run folders; nothing submitted: disk full" in line
    )
    assert submitted == ["baseline-s0", "lr-high-s0"] and not list(out.rglob("*.tmp"))
    for arm in ("baseline-s0", "lr-high-s0"):
        assert json.loads((out / arm / "status.json").read_text())["state"] == "failed"
    filler.unlink()
    assert cli("run", path).code == 0 and submitted == ["baseline-s0", "lr-high-s0"] * 2


def test_a_read_only_file_system_is_one_line(write_sweep, cli, workdir, tmpfs, submitted):
    out = tmpfs / "runs"
    path = write_sweep(f"name: t\noutput_dir: {out}\n" + SWEEP.split("\n", 1)[1])
    out.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    line = one_line(cli("run", path))
    assert (
        line.startswith(f"error: {out}") and "read-only file system" in line and "nothing submitted" in line
    )
    assert submitted == [] and listing(out) == []


# --- data checked before submission ---------------------------------------------------------------------------------


def parquet_sweep(path: str, caption: str) -> str:
    return replace(
        "  data: {kind: synthetic, resolution: 16, caption: long, num_train: 64, num_val: 8}\n",
        f"  data: {{kind: parquet, path: {path}, caption: {caption}, resolution: 16, num_val: 2}}\n",
    )


def test_a_missing_data_file_or_column_is_refused_before_anything_is_submitted(
    write_sweep, cli, workdir, submitted
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_sweep(parquet_sweep("data/train.parquet", "caption_short"))
    for command in (["run", "--dry-run"], ["run"]):
        line = one_line(cli(*command, path), path)
        assert line == (
            f"error: {path}:4: baseline.data.path: arm baseline-s0: parquet file or folder data/train.parquet does not exist; "
            "nothing submitted; expected a data path that exists (relative paths are from the folder you submit from)"
        )
    (workdir / "data").mkdir()
    table = pa.table({"image": [b"x"] * 4, "caption_long": ["a"] * 4})
    pq.write_table(table, workdir / "data" / "train.parquet")
    for command in (["run", "--dry-run"], ["run"]):
        line = one_line(cli(*command, path), path)
        assert line.startswith(
            f"error: {path}:4: baseline.data.caption: arm baseline-s0: column 'caption_short' "
        )
        assert "is not in data/train.parquet (columns: caption_long, image)" in line
    (workdir / "data" / "train.parquet").write_bytes(b"not parquet at all")
    line = one_line(cli("run", path), path)
    assert "data/train.parquet is not a readable parquet file" in line
    assert submitted == [] and not (workdir / "runs").exists()


@pytest.mark.parametrize("kind", ["parquet", "folder"])
def test_a_missing_data_folder_is_not_called_a_file(write_sweep, cli, workdir, submitted, kind):
    data = f"  data: {{kind: {kind}, path: data/shards, caption: c, resolution: 16, num_val: 2}}\n"
    path = write_sweep(
        replace("  data: {kind: synthetic, resolution: 16, caption: long, num_train: 64, num_val: 8}\n", data)
    )
    what = {"parquet": "parquet file or folder", "folder": "data folder"}[kind]
    for command in (["run", "--dry-run"], ["run"]):
        line = one_line(cli(*command, path), path)
        assert f"arm baseline-s0: {what} data/shards does not exist; nothing submitted" in line
    assert submitted == [] and not (workdir / "runs").exists()


def test_a_folder_dataset_without_its_index_or_caption_column_is_refused(write_sweep, cli, workdir):
    images = workdir / "images"
    images.mkdir()
    path = write_sweep(
        replace(
            "  data: {kind: synthetic, resolution: 16, caption: long, num_train: 64, num_val: 8}\n",
            "  data: {kind: folder, path: images, caption: caption_long, resolution: 16, num_val: 2}\n",
        )
    )
    line = one_line(cli("run", "--dry-run", path), path)
    assert line.startswith(
        f"error: {path}:4: baseline.data.path: arm baseline-s0: images/metadata.jsonl does not exist"
    )
    (images / "metadata.jsonl").write_text('{"file_name": "0.png", "caption_short": "a"}\n')
    line = one_line(cli("run", "--dry-run", path), path)
    assert line.startswith(f"error: {path}:4: baseline.data.caption: arm baseline-s0: column 'caption_long'")
    (images / "metadata.jsonl").write_text('{"file_name": "0.png", "caption_long": "a"}\n')
    line = one_line(cli("run", "--dry-run", path), path)
    assert "image images/0.png (first row of images/metadata.jsonl) does not exist" in line
    assert listing(workdir) == ["images", "images/metadata.jsonl", "sweep.yaml"]


def test_a_missing_or_empty_eval_reference_set_is_refused(write_sweep, cli, workdir, submitted):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def sweep_with(ref: str) -> Path:
        return write_sweep(replace("  eval: {every: 2, batch_size: 8}\n", f"  eval: {{reference: {ref}}}\n"))

    expected = (
        "expected eval.reference.path naming photos with their own captions that exist: a parquet file, or a "
        "folder of images with metadata.jsonl (relative paths are from the folder you submit from); or "
        "eval.reference: null to score on the held-out rows"
    )
    path = sweep_with("{kind: parquet, path: real/eval.parquet, caption: caption_llm_s}")
    line = one_line(cli("run", path), path)
    assert line == (
        f"error: {path}:11: baseline.eval.reference.path: arm baseline-s0: reference parquet file or folder real/eval.parquet "
        f"does not exist; nothing submitted; {expected}"
    )
    (workdir / "real").mkdir()
    pq.write_table(pa.table({"caption": ["a"]}), workdir / "real" / "eval.parquet")
    line = one_line(cli("run", "--dry-run", path), path)
    assert line.startswith(f"error: {path}:11: baseline.eval.reference.image_column: arm baseline-s0: ")
    assert "'image' (eval.reference.image_column) is not in real/eval.parquet (columns: caption)" in line
    pq.write_table(pa.table({"image": [b""], "caption": ["a"]}), workdir / "real" / "eval.parquet")
    line = one_line(cli("run", "--dry-run", path), path)
    assert line.startswith(f"error: {path}:11: baseline.eval.reference.caption: arm baseline-s0: ")
    assert (
        "'caption_llm_s' (eval.reference.caption) is not in real/eval.parquet (columns: caption, image)"
        in line
    )
    assert line.endswith(
        "expected eval.reference.caption set to the column of the reference set's own captions"
    )
    path = sweep_with("{kind: folder, path: real, caption: caption_llm_s}")
    (workdir / "real" / "eval.parquet").unlink()
    line = one_line(cli("run", "--dry-run", path), path)
    assert line.endswith(
        "eval.reference.path: arm baseline-s0: real/metadata.jsonl does not exist (a folder dataset needs one "
        f"JSON line per image); nothing submitted; {expected}"
    )
    (workdir / "real" / "metadata.jsonl").write_text(
        '{"file_name": "0.webp", "caption_llm_s": "a grey square"}\n'
    )
    line = one_line(cli("run", "--dry-run", path), path)
    assert "image real/0.webp (first row of real/metadata.jsonl) does not exist" in line
    assert submitted == [] and not (workdir / "runs").exists()
    Image.new("RGB", (8, 8)).save(workdir / "real" / "0.webp")
    assert cli("run", "--dry-run", path).code == 0
    # a reference without its captions: one line at validation, before any file is looked at
    path = sweep_with("{kind: folder, path: real}")
    line = one_line(cli("run", "--dry-run", path), path)
    assert (
        "baseline.eval.reference" in line
        and "eval.reference needs caption: the column of its own captions" in line
    )
