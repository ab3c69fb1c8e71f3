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
        pytest.fail(f"local SLURM did not come up: {up.stderr.strip() or up.stdout.strip()}")
    env = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
    saved = dict(os.environ)
    for line in env.splitlines():  # `export NAME=value` lines, when clients need them
        name, _, value = line.removeprefix("export ").partition("=")
        os.environ[name] = value.strip("'\"")
    yield
    os.environ.clear()
    os.environ.update(saved)
