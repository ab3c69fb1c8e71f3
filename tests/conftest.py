"""Fixtures for every test folder: the real single-node SLURM cluster (scripts/local-slurm.sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local-slurm.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real SLURM cluster on this machine, started (and installed, as root with apt) by the script.

    Skips with the script's reason where the machine cannot run one (not root, no apt); on this
    project's machines and CI it runs. The cluster is left up for the next session: `up` is idempotent
    and `scripts/local-slurm.sh down` stops what it started.
    """
    check = subprocess.run([str(SCRIPT), "check"], capture_output=True, text=True)
    if check.returncode == 3:
        pytest.skip(check.stdout.strip() or check.stderr.strip())
    up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        said = up.stderr.strip() or up.stdout.strip() or "it printed nothing"
        pytest.fail(f"local SLURM did not come up ({SCRIPT.name} up exited {up.returncode}): {said}")
    env = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
    saved = dict(os.environ)
    for line in env.splitlines():  # `export NAME=value` lines, when clients need them
        name, _, value = line.removeprefix("export ").partition("=")
        os.environ[name] = value.strip("'\"")
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt when missing (as root); skips where it cannot be."""
    import shutil

    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("no chromium here, and cannot install it (not root, or no apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:  # stale package lists on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0 or not shutil.which("chromium"):
        lines = (done.stderr or done.stdout).strip().splitlines()
        pytest.fail(f"could not install chromium: {lines[-1] if lines else 'apt-get failed'}")
    return shutil.which("chromium")
