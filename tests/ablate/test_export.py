"""`ablate export`: an arm's checkpoint as a diffusers folder that `PRXTransformer2DModel.from_pretrained`
loads, with the EMA's weights (or, with --raw, the trained ones); a mistake is one line, exit code 2,
nothing written. (A sharded checkpoint's export: tests/trainer/test_dcp.py.)"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from ablate_testing import SWEEP, trained_sweep
from diffusers import PRXTransformer2DModel
from safetensors.torch import load_file

from core.rundir import RunDir
from trainer.runtime import checkpoint, pretrained

# two arms, one with an EMA (decay 0.9: its shadow is far from the weights after 4 steps), one without;
# checkpoints (whole: one process) kept at steps 2 and 4
EXPORT_SWEEP = (
    SWEEP.replace(
        "  precision: {kind: fp32}\n", "  precision: {kind: fp32}\n  ema: {kind: ema, decay: 0.9}\n"
    )
    .replace("eval: {every: 2,", "eval: {every: 4,")
    .replace("  lr-high:\n    optimizer.lr: 3e-3\n", "  no-ema:\n    ema: null\n")
)


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if not p.is_symlink()}


def loaded(folder: Path) -> dict[str, torch.Tensor]:
    """What diffusers loads from an export."""
    return PRXTransformer2DModel.from_pretrained(folder / "transformer").state_dict()


def saved(ckpt: Path) -> tuple[dict, dict]:
    """A whole checkpoint's (transformer weights, EMA shadow of them), keyed as diffusers keys them."""
    shadow = torch.load(ckpt / "state.pt", weights_only=False)["ema"].get("shadow", {})
    prx = {k.removeprefix("prx."): v for k, v in shadow.items() if k.startswith("prx.")}
    return load_file(ckpt / pretrained.WEIGHTS), prx


trained, sweep_path = trained_sweep(EXPORT_SWEEP)  # the two arms, trained once for this module


def test_export_writes_the_ema_weights_diffusers_loads_and_raw_the_trained_ones(sweep_path, cli, workdir):
    arm = RunDir(workdir / "runs" / "t" / "baseline-s0")
    trained_4, shadow_4 = saved(arm.checkpoint(4))
    assert shadow_4.keys() == trained_4.keys()
    assert not all(torch.equal(shadow_4[k], trained_4[k]) for k in shadow_4)  # the two differ

    result = cli("export", sweep_path, "baseline-s0")
    assert result.code == 0, result.err
    out = arm.path / "export" / "step_00000004"  # the newest checkpoint, by default in the run folder
    assert result.out.splitlines() == [
        f"exported baseline-s0 step 4 (EMA weights) to {out}",
        f'load it: PRXTransformer2DModel.from_pretrained("{out}/transformer")',
    ]
    weights = loaded(out)
    assert weights.keys() == shadow_4.keys() and all(torch.equal(weights[k], shadow_4[k]) for k in weights)
    assert json.loads((out / "export.json").read_text())["weights"] == "ema"
    assert checkpoint.verify(arm.checkpoint(4)) is None  # read, not touched

    result = cli("export", sweep_path, "baseline-s0", "--step", "2", "--raw", "--out", "mine")
    assert result.code == 0, result.err
    assert f"exported baseline-s0 step 2 (raw weights) to {workdir / 'mine'}" in result.out
    trained_2 = saved(arm.checkpoint(2))[0]
    assert all(torch.equal(loaded(workdir / "mine")[k], trained_2[k]) for k in trained_2)
    # an earlier export is replaced whole
    assert cli("export", sweep_path, "baseline-s0", "--raw", "--out", "mine").code == 0
    assert all(torch.equal(loaded(workdir / "mine")[k], trained_4[k]) for k in trained_4)
    assert json.loads((workdir / "mine" / "export.json").read_text())["step"] == 4


def test_an_arm_without_an_ema_exports_its_trained_weights(sweep_path, cli, workdir):
    arm = RunDir(workdir / "runs" / "t" / "no-ema-s0")
    result = cli("export", sweep_path, "no-ema-s0", "--out", "plain")
    assert result.code == 0, result.err
    assert "exported no-ema-s0 step 4 (raw weights: the arm keeps no EMA)" in result.out
    trained_4, shadow = saved(arm.checkpoint(4))
    assert not shadow and all(torch.equal(loaded(workdir / "plain")[k], trained_4[k]) for k in trained_4)


def test_the_newest_checkpoint_that_verifies_is_exported_and_nothing_is_set_aside(sweep_path, cli, workdir):
    arm = RunDir(workdir / "runs" / "t" / "baseline-s0")
    state = arm.checkpoint(4) / "state.pt"
    state.write_bytes(state.read_bytes() + b"rot")
    status = (arm.path / "status.json").read_text()

    result = cli("export", sweep_path, "baseline-s0")
    assert result.code == 0, result.err
    assert "exported baseline-s0 step 2 (EMA weights)" in result.out
    assert f"warning: {arm.checkpoint(4)}: fails verification (state.pt has" in result.err
    assert "skipped, left in place" in result.err
    assert arm.checkpoint_steps() == [2, 4] and (arm.path / "status.json").read_text() == status

    before = listing(workdir)
    refused = cli("export", sweep_path, "baseline-s0", "--step", "4")
    assert refused.code == 2 and refused.err.count("\n") == 1
    assert refused.err.startswith(f"error: --step: {arm.checkpoint(4)}: fails verification (state.pt has")
    assert listing(workdir) == before


def user_folder(workdir: Path) -> str:
    (workdir / "mine").mkdir()
    (workdir / "mine" / "notes.txt").write_text("my own")
    return "mine"


@pytest.mark.parametrize(
    "args, said",
    [
        (
            ["baselin-s0"],
            "error: ARM: no arm named 'baselin-s0' (did you mean 'baseline-s0'?); expected one of:",
        ),
        (["baseline-s0", "--step", "3"], "no checkpoint at step 3 ("),
        (["baseline-s0", "--out", user_folder], "holds files and no export.json (it is no earlier export)"),
        (["baseline-s0", "--out", "runs/t/baseline-s0/checkpoints/x"], "is inside an arm's checkpoints/"),
        (["baseline-s0", "--out", "sweep.yaml/x"], "sweep.yaml/x lies under "),
        (["no-ema-s0"], "error: ARM: arm 'no-ema-s0' has no checkpoint yet"),
    ],
)
def test_a_mistake_is_one_line_and_nothing_is_written(sweep_path, cli, workdir, args, said):
    shutil.rmtree(workdir / "runs" / "t" / "no-ema-s0" / "checkpoints")
    args = [a(workdir) if callable(a) else a for a in args]
    before = listing(workdir)
    result = cli("export", sweep_path, *args)
    assert result.code == 2 and result.out == ""
    assert result.err.count("\n") == 1 and result.err.startswith("error: ") and said in result.err
    if "--step" in args:
        assert result.err.startswith("error: --step: ") and result.err.endswith(
            "expected a kept step: 2, 4\n"
        )
    if "no-ema-s0" in args:
        assert "expected an arm that has saved one (`ablate status`)" in result.err
    assert listing(workdir) == before


def test_no_export_goes_through_a_link_in_the_run_folder(sweep_path, cli, workdir):
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    (workdir / "runs" / "t" / "baseline-s0" / "export").symlink_to(elsewhere)
    result = cli("export", sweep_path, "baseline-s0")
    assert result.code == 2 and "is a symbolic link in the sweep's output folder" in result.err
    assert not any(elsewhere.iterdir())


def test_a_full_disk_is_one_line_and_leaves_no_partial_folder(sweep_path, cli, workdir, monkeypatch):
    def full(path, *args):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pretrained, "write_safetensors", full)
    result = cli("export", sweep_path, "baseline-s0", "--out", "out")
    assert result.code == 2 and result.err.count("\n") == 1
    assert result.err.startswith(f"error: {workdir / 'out'}: exporting: disk full; expected free space")
    assert sorted(p.name for p in workdir.iterdir()) == ["runs", "sweep.yaml"]  # no .out.tmp left
