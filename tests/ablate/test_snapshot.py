"""Code snapshots: what a queued job runs is the code at submission, recorded with its commit and diff."""

from __future__ import annotations

import json
import subprocess

from ablate.running import snapshot


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_a_snapshot_freezes_the_working_tree_with_its_uncommitted_changes(tmp_path, monkeypatch):
    repo = tmp_path / "checkout"
    (repo / "trainer").mkdir(parents=True)
    (repo / "trainer" / "train.py").write_text("LR = 1\n")
    (repo / "notes.txt").write_text("not a package\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "x", "--allow-empty")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    monkeypatch.setattr(snapshot, "source_root", lambda: repo)
    sweep = tmp_path / "runs" / "s"

    clean = snapshot.take(sweep)
    assert not clean.record.dirty and clean.diff == ""
    assert (clean.folder / "trainer" / "train.py").read_text() == "LR = 1\n"
    assert not (clean.folder / "notes.txt").exists()  # only the packages a job imports
    assert snapshot.take(sweep).folder == clean.folder  # the same state: reused, not copied again

    (repo / "trainer" / "train.py").write_text("LR = 2\n")  # edited while an arm waits in the queue
    (repo / "trainer" / "new.py").write_text("X = 3\n")
    dirty = snapshot.take(sweep)
    assert dirty.record.dirty and dirty.record.untracked == ["trainer/new.py"]
    assert "-LR = 1\n+LR = 2" in dirty.diff and dirty.folder != clean.folder
    assert (dirty.folder / "trainer" / "new.py").exists()
    assert (
        clean.folder / "trainer" / "train.py"
    ).read_text() == "LR = 1\n"  # the queued job's code is unchanged
    setup = dirty.job_setup()
    assert setup[0] == "export PYTHONSAFEPATH=1" and str(dirty.folder) in setup[1]


def test_a_snapshot_holds_source_only_and_names_the_untracked_files_it_left_out(tmp_path, monkeypatch):
    repo = tmp_path / "checkout"
    for package in ("ablate", "core", "trainer", "eval"):
        (repo / package).mkdir(parents=True)
        (repo / package / "__init__.py").write_text("")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    monkeypatch.setattr(snapshot, "source_root", lambda: repo)
    sweep = tmp_path / "runs" / "s"
    clean = snapshot.take(sweep)

    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY\n")
    (repo / "trainer" / ".env").write_text("WANDB_API_KEY=secret\n")
    (repo / "ablate" / "credentials.json").write_text('{"token": "secret"}\n')
    with (repo / "eval" / "features.bin").open("wb") as f:
        f.truncate(20 << 20)  # 20 MB of data left lying in a package
    (repo / "core" / "key.py").symlink_to(secret)  # a link with a source name: not copied either
    (repo / "trainer" / "new.py").write_text("X = 3\n")  # new source, not committed yet: jobs need it
    taken = snapshot.take(sweep)

    left_out = ["ablate/credentials.json", "core/key.py", "eval/features.bin", "trainer/.env"]
    assert taken.record.untracked == ["trainer/new.py"] and taken.record.left_out == left_out
    copied = sorted(str(p.relative_to(taken.folder)) for p in taken.folder.rglob("*") if p.is_file())
    assert copied == [f"{p}/__init__.py" for p in ("ablate", "core", "eval", "trainer")] + ["trainer/new.py"]
    assert b"secret" not in b"".join((taken.folder / f).read_bytes() for f in copied)
    assert snapshot.left_out_note(taken.record) == (
        "code snapshot: 4 untracked file(s) left out, not source (ablate/credentials.json, core/key.py, "
        "eval/features.bin and 1 more); jobs do not see them (code.json lists them): commit them for jobs "
        "to use them"
    )

    # What is left out does not make a new snapshot: the hash covers only what is copied.
    (repo / "trainer" / ".env").write_text("WANDB_API_KEY=another\n")
    (repo / "eval" / "features.bin").write_bytes(b"other data")
    assert snapshot.take(sweep).folder == taken.folder
    (repo / "trainer" / "new.py").write_text("X = 4\n")
    assert snapshot.take(sweep).folder not in (taken.folder, clean.folder)
    assert all(f.suffix == ".py" for f in (sweep / ".code").rglob("*") if f.is_file())
    assert snapshot.left_out_note(clean.record) is None


def test_ablate_run_says_in_one_line_what_the_snapshot_left_out(
    tmp_path, monkeypatch, write_sweep, cli, workdir
):
    from ablate.running import jobs

    repo = tmp_path / "checkout"
    (repo / "trainer").mkdir(parents=True)
    (repo / "trainer" / "train.py").write_text("LR = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    (repo / "trainer" / ".env").write_text("WANDB_API_KEY=secret\n")
    monkeypatch.setattr(snapshot, "source_root", lambda: repo)
    monkeypatch.setattr(jobs, "submit", lambda executor, run_dirs, **kwargs: [])  # nothing trains here
    result = cli("run", write_sweep())
    assert result.code == 0, result
    lines = [line for line in result.out.splitlines() if line.startswith("code snapshot:")]
    assert lines == [
        "code snapshot: 1 untracked file(s) left out, not source (trainer/.env); jobs do not see them "
        "(code.json lists them): commit them for jobs to use them"
    ]
    code = json.loads((workdir / "runs" / "t" / "baseline-s0" / "code.json").read_text())
    assert code["left_out"] == ["trainer/.env"] and code["untracked"] == []
    assert not list((workdir / "runs" / "t" / ".code").rglob(".env"))
