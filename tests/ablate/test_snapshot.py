"""Code snapshots: what a queued job runs is the code at submission, recorded with its commit and diff."""

from __future__ import annotations

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
