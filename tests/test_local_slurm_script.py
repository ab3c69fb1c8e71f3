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


def test_apt_get_waits_while_another_apt_get_holds_its_lock(tmp_path):
    """`up` installs through `apt_get`: it hands apt dpkg's lock timeout and tries `apt-get update` again
    while another apt-get holds the lists lock (apt itself fails at once); any other failure ends it."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "apt-get"  # the first call finds the lock held, as apt-get says it
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/bash\n"
        f'echo "$*" >>{calls}\n'
        f'if [[ $(wc -l <{calls}) == 1 ]]; then echo "E: Could not get lock /var/lib/apt/lists/lock. It is '
        'held by process 4242 (apt-get)" >&2; exit 100; fi\n'
        'if [[ $* == *broken* ]]; then echo "E: Unable to locate package broken" >&2; '
        "exit 100; fi\n"
        "echo done\n"
    )
    fake.chmod(0o755)

    def apt_get(*args: str, wait: int = 600) -> subprocess.CompletedProcess:
        calls.unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "ABLATE_APT_LOCK_WAIT": str(wait),
               "ABLATE_SLURM_DIR": str(tmp_path / "state")}  # fmt: skip
        command = f'source "{SCRIPT}" && {{ apt_get "$@" || exit $?; }}'  # as `up` calls it: in a list
        return subprocess.run(["bash", "-c", command, "apt_get", *args], capture_output=True, text=True,
                              env=env, timeout=60)  # fmt: skip

    done = apt_get("update", "-q")
    assert done.returncode == 0 and done.stdout.endswith("done\n"), done
    assert calls.read_text().splitlines() == ["-o DPkg::Lock::Timeout=600 update -q"] * 2
    done = apt_get("install", "-y", "broken")  # the lock, then a failure of another kind: no third try
    assert done.returncode == 100 and "Unable to locate package broken" in done.stdout
    assert len(calls.read_text().splitlines()) == 2
    done = apt_get("update", wait=0)  # waited long enough: the lock's error ends it
    assert done.returncode == 100 and "Could not get lock" in done.stdout
    assert calls.read_text().splitlines() == ["-o DPkg::Lock::Timeout=0 update"]
