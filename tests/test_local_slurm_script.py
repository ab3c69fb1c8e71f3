"""scripts/local-slurm.sh itself: what it says about a cluster it cannot find (no scheduler needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local-slurm.sh"


def test_local_slurm_status_names_a_daemon_whose_pid_file_outlived_it(tmp_path):
    """After a reboot the state folder keeps pid files of dead daemons: `status` must say so, not exit silently."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mariadb.pid").write_text(
        "9999999\n"
    )  # above the kernel's largest pid_max (2**22): never a live process
    env = {**os.environ, "ABLATE_SLURM_DIR": str(tmp_path)}
    done = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1
    assert done.stdout.strip() == "local slurm: down (mariadbd not running)"
