"""The one atomic write: whole files only, the mode any normal file gets, nothing left behind."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from core.atomic import Unreadable, atomic_path, atomic_write, atomic_write_json, commit_dir, read_json


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_mode_of_a_normal_file_under_the_umask(tmp_path, umask):
    # The umask is read once at import, as it must be (setting it to read it is not thread-safe): a
    # fresh interpreter per umask, writing through every entry point, beside a file made by open().
    script = f"""
from core.atomic import atomic_path, atomic_write, atomic_write_json
d = {str(tmp_path)!r}
atomic_write(d + "/text", "x")
atomic_write_json(d + "/json", {{"a": 1}})
with atomic_path(d + "/png") as tmp:
    tmp.write_bytes(b"png")
open(d + "/plain", "w").close()
"""
    subprocess.run([sys.executable, "-c", f"import os; os.umask({umask}); exec({script!r})"], check=True)
    expected = 0o666 & ~umask
    assert {name: mode(tmp_path / name) for name in ("text", "json", "png", "plain")} == dict.fromkeys(
        ("text", "json", "png", "plain"), expected
    )


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "status.json"
    atomic_write_json(target, {"state": "running"})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("{ half")
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"state": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_write_creates_the_folder_and_replaces_whole(tmp_path):
    target = tmp_path / "eval" / "step_2.json"
    atomic_write(target, "a" * 1000)
    atomic_write(target, b"b")
    assert target.read_bytes() == b"b"


def test_commit_dir_renames_a_written_folder_into_place(tmp_path):
    tmp, final = tmp_path / ".step_00000002.tmp", tmp_path / "step_00000002"
    (tmp / "transformer").mkdir(parents=True)
    (tmp / "transformer" / "w.safetensors").write_bytes(b"w")
    (tmp / "state.pt").write_bytes(b"s")
    commit_dir(tmp, final)
    assert not tmp.exists() and (final / "transformer" / "w.safetensors").read_bytes() == b"w"


def test_read_json_absent_is_the_default_and_corrupt_names_the_file(tmp_path):
    assert read_json(tmp_path / "none.json", default={}) == {}
    bad = tmp_path / "spec.json"
    bad.write_bytes(b"\x00\x00\x00")
    with pytest.raises(Unreadable) as e:
        read_json(bad)
    assert str(e.value).startswith(f"{bad}: unreadable (not JSON") and "\n" not in str(e.value)
