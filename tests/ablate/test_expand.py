"""Expansion: sweep → one validated run spec per arm (real trainer schema)."""

from __future__ import annotations

import copy

import pytest
from ablate_testing import SWEEP

from ablate.errors import UserError
from ablate.sweep.expand import changes, config_hash, expand, merge
from ablate.sweep.loader import load_yaml
from ablate.sweep.schema import load_sweep


def sweep_from(write_sweep, deltas: str = "", seeds: str = "[0]"):
    text = SWEEP.replace("  lr-high:\n    optimizer.lr: 3e-3\n", deltas).replace(
        "seeds: [0]", f"seeds: {seeds}"
    )
    if not deltas:
        text = text.replace("deltas:\n", "deltas: {}\n")
    return load_sweep(write_sweep(text))


def test_names_baseline_first_then_each_delta_times_each_seed(write_sweep):
    deltas = "  lr-high:\n    optimizer.lr: 3e-3\n  muon:\n    optimizer: {kind: muon}\n"
    specs = expand(sweep_from(write_sweep, deltas, seeds="[0, 1]"))
    assert [s.name for s in specs] == [
        "baseline-s0",
        "baseline-s1",
        "lr-high-s0",
        "lr-high-s1",
        "muon-s0",
        "muon-s1",
    ]
    assert [(s.delta, s.seed) for s in specs][2] == ("lr-high", 0)
    assert all(s.config["seed"] == s.seed for s in specs)
    assert specs[2].overrides == {"optimizer.lr": 3e-3}


def test_the_baseline_may_run_more_seeds_than_the_deltas(write_sweep):
    sweep = sweep_from(
        write_sweep, "  lr-high:\n    optimizer.lr: 3e-3\n", seeds="{baseline: [0, 1, 2, 3], deltas: [0, 1]}"
    )
    names = [s.name for s in expand(sweep)]
    assert names == ["baseline-s0", "baseline-s1", "baseline-s2", "baseline-s3", "lr-high-s0", "lr-high-s1"]


def test_dotted_and_nested_overrides_merge_into_the_baseline(write_sweep):
    deltas = "  both:\n    optimizer.lr: 3e-3\n    optimizer: {weight_decay: 0.1}\n    train: {steps: 6}\n"
    base, arm = expand(sweep_from(write_sweep, deltas))
    assert arm.config["optimizer"] == {**base.config["optimizer"], "lr": 3e-3, "weight_decay": 0.1}
    assert arm.config["train"] == {**base.config["train"], "steps": 6}
    assert base.config["optimizer"]["lr"] == 1e-3  # the baseline is untouched


def test_exponent_floats_without_a_dot_are_numbers(write_sweep):
    _, arm = expand(sweep_from(write_sweep, "  x:\n    optimizer.lr: 3e-3\n"))
    assert arm.config["optimizer"]["lr"] == 0.003


def test_null_turns_a_component_off_and_a_map_turns_it_on(write_sweep):
    sweep = sweep_from(write_sweep, "  ema-on:\n    ema: {kind: ema}\n")
    base, on = expand(sweep)
    assert base.config["ema"] is None and on.config["ema"]["kind"] == "ema"
    text = SWEEP.replace("  log: {every: 1}\n", "  log: {every: 1}\n  ema: {kind: ema}\n").replace(
        "    optimizer.lr: 3e-3\n", "    ema: null\n"
    )
    base, off = expand(load_sweep(write_sweep(text, name="on.yaml")))
    assert base.config["ema"]["kind"] == "ema" and off.config["ema"] is None


def test_a_new_kind_replaces_the_component_instead_of_merging(write_sweep):
    _, muon = expand(sweep_from(write_sweep, "  muon:\n    optimizer: {kind: muon, lr: 0.02}\n"))
    assert muon.config["optimizer"]["kind"] == "muon"
    assert muon.config["optimizer"]["lr"] == 0.02
    assert "betas" not in muon.config["optimizer"]  # AdamW's fields did not leak into Muon
    _, dotted = expand(sweep_from(write_sweep, "  muon:\n    optimizer.kind: muon\n    optimizer.lr: 0.02\n"))
    assert dotted.config == muon.config and dotted.hash == muon.hash


def test_merge_keeps_fields_when_the_kind_is_unchanged():
    base = {"optimizer": {"kind": "adamw", "lr": 1, "eps": 2}}
    merged, replaced = merge(base, {"optimizer": {"kind": "adamw", "lr": 3}})
    assert merged == {"optimizer": {"kind": "adamw", "lr": 3, "eps": 2}} and replaced == []
    merged, replaced = merge(base, {"optimizer": {"kind": "muon"}})
    assert merged == {"optimizer": {"kind": "muon"}} and replaced == [("optimizer",)]
    assert base == {"optimizer": {"kind": "adamw", "lr": 1, "eps": 2}}  # inputs are not mutated


def test_hash_is_stable_and_follows_the_resolved_config(write_sweep):
    a = expand(sweep_from(write_sweep, "  x:\n    optimizer.lr: 3e-3\n", seeds="[0, 1]"))
    b = expand(sweep_from(write_sweep, "  x:\n    optimizer: {lr: 0.003}\n", seeds="[0, 1]"))
    assert [s.hash for s in a] == [s.hash for s in b]  # same resolved config, however it was written
    assert len({s.hash for s in a}) == 4  # seed and delta both change it
    assert all(len(s.hash) == 12 and int(s.hash, 16) >= 0 for s in a)
    assert a[0].hash == config_hash(copy.deepcopy(a[0].config))
    c = expand(sweep_from(write_sweep, "  x:\n    optimizer.lr: 4e-3\n", seeds="[0, 1]"))
    assert c[2].hash != a[2].hash and c[0].hash == a[0].hash


def test_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": {"c": 2, "d": 3}}) == config_hash({"b": {"d": 3, "c": 2}, "a": 1})


def test_expand_is_pure(write_sweep, workdir):
    sweep = sweep_from(write_sweep, "  x:\n    optimizer: {kind: muon}\n")
    before = sweep.model_dump()
    assert expand(sweep) == expand(sweep)
    assert sweep.model_dump() == before
    assert sorted(p.name for p in workdir.iterdir()) == ["sweep.yaml"]


def test_changes_list_what_a_delta_changes(write_sweep):
    base, arm = expand(
        sweep_from(write_sweep, "  x:\n    optimizer: {kind: muon, lr: 0.02}\n    ema: {kind: ema}\n")
    )
    lines = {key: (old, new) for key, old, new in changes(base.config, arm.config)}
    assert lines["optimizer.kind"] == ("adamw", "muon")
    assert lines["optimizer.lr"] == (1e-3, 0.02)
    assert "optimizer.betas" not in lines and "optimizer.momentum" not in lines  # implied by the kind
    assert lines["ema"][0] is None and lines["ema"][1]["kind"] == "ema"


def test_error_in_a_delta_arm_is_located_in_the_delta(write_sweep):
    with pytest.raises(UserError) as e:
        expand(sweep_from(write_sweep, "  x:\n    train:\n      steps: -1\n"))
    assert e.value.path == "deltas.x.train.steps" and e.value.line == 16


def test_loader_records_lines_and_keeps_merge_keys(workdir):
    path = workdir / "a.yaml"
    path.write_text("base: &b\n  x: 1\n  y: 2\nother:\n  <<: *b\n  y: 3\n")
    data, lines = load_yaml(path)
    assert data["other"] == {"x": 1, "y": 3}
    assert lines[("base", "x")] == 2 and lines[("other", "y")] == 6 and lines[("other", "x")] == 2
