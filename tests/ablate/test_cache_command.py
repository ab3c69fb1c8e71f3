"""`ablate cache`: one cache per distinct cache key, shared by the arms that differ elsewhere."""

from __future__ import annotations

import json

from ablate_testing import SWEEP

from ablate.sweep.expand import expand
from ablate.sweep.schema import load_sweep
from trainer.config import TrainConfig
from trainer.data.cache import cache_key

# baseline and lr-high share a cache (they differ in the optimizer only); short captions need
# their own; `live` encodes every step (no cache).
CACHE_SWEEP = SWEEP.replace("  log: {every: 1}\n", "  log: {every: 1}\n  cache: {dir: caches}\n").replace(
    "seeds: [0]", "  short:\n    data.caption: short\n  live:\n    cache: null\nseeds: [0, 1]"
)


def keys(path) -> dict[str, str]:
    """{arm: its cache key}, for the arms that use a cache."""
    specs = [s for s in expand(load_sweep(path)) if s.config["cache"]]
    return {s.name: cache_key(TrainConfig.model_validate(s.config).encoded()) for s in specs}


def test_dry_run_groups_the_arms_by_cache_key_and_computes_nothing(write_sweep, cli, workdir):
    path = write_sweep(CACHE_SWEEP)
    by_arm = keys(path)
    assert by_arm["baseline-s0"] == by_arm["lr-high-s1"] != by_arm["short-s0"]
    result = cli("cache", path, "--dry-run")
    assert result.code == 0, result.err
    lines = {line.split("│")[1].strip(): line for line in result.out.splitlines() if line.startswith("│ ")}
    shared, short = lines[by_arm["baseline-s0"]], lines[by_arm["short-s0"]]
    assert "missing" in shared and "baseline-s0, baseline-s1, lr-high-s0, lr-high-s1" in shared
    assert "missing" in short and "short-s0, short-s1" in short
    assert "not using a cache (no `cache:` set): live-s0, live-s1" in result.out
    assert "dry run: nothing computed" in result.out
    assert sorted(p.name for p in workdir.iterdir()) == ["sweep.yaml"]


def test_cache_fills_each_missing_key_once_then_keeps_it(write_sweep, cli, workdir):
    path = write_sweep(CACHE_SWEEP)
    by_arm = keys(path)
    (workdir / "caches" / by_arm["short-s0"]).mkdir(parents=True)  # an interrupted precompute
    assert "incomplete" in cli("cache", path, "--dry-run").out

    result = cli("cache", path)
    assert result.code == 0, result.out + result.err
    assert "2 cache(s) computed, 0 already complete" in result.out
    assert sorted(p.name for p in (workdir / "caches").iterdir()) == sorted(set(by_arm.values()))
    manifests = {}
    for key in set(by_arm.values()):
        manifest = workdir / "caches" / key / "manifest.json"
        assert json.loads(manifest.read_text())["hash"] == key
        manifests[key] = manifest.stat().st_mtime_ns

    again = cli("cache", path)
    assert again.code == 0 and "0 cache(s) computed, 2 already complete" in again.out
    assert {k: (workdir / "caches" / k / "manifest.json").stat().st_mtime_ns for k in manifests} == manifests


def test_a_cache_folder_holding_another_config_is_refused(write_sweep, cli, workdir):
    path = write_sweep(CACHE_SWEEP)
    key = keys(path)["short-s0"]
    (workdir / "caches" / key).mkdir(parents=True)
    (workdir / "caches" / key / "manifest.json").write_text(json.dumps({"hash": "0123456789abcdef"}))
    result = cli("cache", path, "--dry-run")
    assert result.code == 2 and result.err.count("\n") == 1
    assert f"cache {workdir / 'caches' / key} (for arm short-s0) holds another config's latents" in result.err


def test_run_refuses_arms_whose_cache_is_not_computed_and_names_the_command(write_sweep, cli, workdir):
    path = write_sweep(CACHE_SWEEP.replace("  short:\n    data.caption: short\n", ""))
    refused = cli("run", path)
    assert refused.code == 2 and refused.err.count("\n") == 1, refused.err
    assert (
        f"arm baseline-s0: cache {workdir / 'caches' / keys(path)['baseline-s0']} is missing" in refused.err
    )
    assert f"`ablate cache {path}` computes every missing one" in refused.err
    assert "baseline.cache.dir" in refused.err  # located where the sweep sets it
    assert sorted(p.name for p in workdir.iterdir()) == ["sweep.yaml"]  # nothing created, nothing submitted
    assert cli("cache", path).code == 0
    planned = cli("run", path, "--dry-run")
    assert planned.code == 0 and "baseline-s0" in planned.out, planned.err
