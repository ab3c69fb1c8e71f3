"""Sharded checkpoints (FSDP on several processes): torch.distributed.checkpoint files each process writes
and hashes, resumed at another world size and layout, a damaged shard set aside, and the diffusers
folder an arm's last checkpoint (or `ablate export`) holds. Real trainer jobs on gloo processes."""

import json
import shutil
import socket

import pytest
import torch
import yaml
from diffusers import PRXTransformer2DModel
from trainer_testing import TINY, logged_losses, merge, metrics_by_step, run_processes

from core.rundir import RunDir
from trainer import job
from trainer.runtime import checkpoint, sharded

# Muon (block matrices) and AdamW (the rest), an EMA, 12 samples a step (a multiple of 1, 2 and 3)
ARM = dict(
    train={"steps": 8, "batch_size": 12},
    optimizer={"kind": "muon", "lr": 0.02, "weight_decay": 0.1, "adam_lr": 1e-3},
    ema={"kind": "ema", "decay": 0.9},
    parallel={"kind": "fsdp"},
)


def resumed_state(run_dir, world: int, tmp_path) -> dict:
    """What the trainer holds, gathered whole, after resuming `run_dir` on `world` processes."""
    import dcp_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"held-{run_dir.name}.pt"
    args = (world, port, str(run_dir), str(out))
    torch.multiprocessing.start_processes(dcp_worker.run, args=args, nprocs=world, start_method="fork")
    return torch.load(out, weights_only=False)


def copy_checkpoints(src, dst, *steps):
    for step in steps:
        shutil.copytree(RunDir(src).checkpoint(step), RunDir(dst).checkpoint(step))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One FSDP arm trained on two processes: checkpoints 4 (sharded only) and 8 (the last)."""
    root = tmp_path_factory.mktemp("dcp")
    arm = root / "arm"
    arm.mkdir()
    (arm / "config.yaml").write_text(yaml.safe_dump(merge(TINY, ARM)))
    run_processes(arm)
    return arm


def test_every_process_writes_and_hashes_its_own_shard_and_the_last_checkpoint_loads_in_diffusers(trained):
    step4, step8 = checkpoint.complete(trained)
    for ckpt in (step4, step8):
        assert sharded.is_sharded(ckpt) and checkpoint.verify(ckpt) is None
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
        writers = {name: entry.get("writer") for name, entry in files.items() if name.startswith("dcp/")}
        # one file per process, hashed by the process that wrote it; DCP's index by the main process
        assert writers == {"dcp/.metadata": 0, "dcp/__0_0.distcp": 0, "dcp/__1_0.distcp": 1}
        sizes = [files[f"dcp/__{r}_0.distcp"]["size"] for r in (0, 1)]
        assert min(sizes) > 0.3 * max(sizes)  # each holds its share, not one holding everything
    assert not (step4 / "transformer").exists()  # no gather on the way: a step's save is shards only

    # the last checkpoint also holds the whole weights as a diffusers folder, equal to its shards
    model = PRXTransformer2DModel.from_pretrained(step8 / "transformer")
    shards = sharded.read_whole(step8, "model.prx.")
    assert model.state_dict().keys() == shards.keys()
    assert all(torch.equal(model.state_dict()[k], shards[k]) for k in shards)


@pytest.mark.parametrize("world", [1, 3])
def test_a_checkpoint_saved_on_two_processes_resumes_bit_for_bit_on_one_and_on_three(
    trained, tmp_path, world
):
    """DCP reshards: one process reads whole tensors (no FSDP at one process), three cut their own rows;
    the weights, both optimizers' state and the EMA are the saved ones, bit for bit."""
    run = tmp_path / f"world{world}"
    run.mkdir()
    shutil.copy(trained / "config.yaml", run / "config.yaml")
    copy_checkpoints(trained, run, 4)
    held = resumed_state(run, world, tmp_path)
    weights, saved = sharded.read_state(RunDir(trained).checkpoint(4))

    assert held["step"] == 4 and held["layout"] == ("Sharded" if world > 1 else "Replicated")
    assert held["weights"].keys() == weights.keys()
    assert all(torch.equal(held["weights"][k], weights[k]) for k in weights)
    assert set(saved["optimizer"]) == {"muon", "adamw"}
    for name, opt in saved["optimizer"].items():
        by_param = opt["state"]
        assert held["optimizer"][name].keys() == by_param.keys()
        for param, moments in by_param.items():
            for moment, value in moments.items():
                assert torch.equal(held["optimizer"][name][param][moment], value), (name, param, moment)
    shadow = saved["ema"]["shadow"]
    assert shadow and all(torch.equal(held["ema"]["shadow"][k], v) for k, v in shadow.items())


def test_a_whole_checkpoint_of_one_process_resumes_sharded_on_two(tmp_path):
    """An FSDP arm run on one process saves a whole checkpoint, its optimizer state keyed by position
    (nothing is sharded on one process); moved to two processes it resumes from it, holding exactly
    what one process holds after the same resume."""
    one = tmp_path / "one"
    one.mkdir()
    (one / "config.yaml").write_text(
        yaml.safe_dump(merge(TINY, {**ARM, "train": {"steps": 4, "batch_size": 12}}))
    )
    run_processes(one, world=1)
    ckpt = checkpoint.latest(one)
    assert not sharded.is_sharded(ckpt)
    assert all(
        isinstance(k, int)
        for k in torch.load(ckpt / "state.pt", weights_only=False)["optimizer"]["muon"]["state"]
    )
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(one / "config.yaml", two / "config.yaml")
    copy_checkpoints(one, two, 4)
    held = {world: resumed_state(run, world, tmp_path) for world, run in ((1, one), (2, two))}
    assert held[2]["layout"] == "Sharded" and held[2]["step"] == held[1]["step"] == 4
    for part in ("weights", "optimizer", "ema"):
        flat = {w: dict(torch.utils._pytree.tree_flatten_with_path(held[w][part])[0]) for w in (1, 2)}
        assert flat[2].keys() == flat[1].keys() and len(flat[1]) > 10, part
        assert all(torch.equal(flat[2][k], flat[1][k]) for k in flat[1]), part


def test_an_arm_resumed_on_three_processes_trains_on_as_it_would_have(trained, tmp_path):
    run = tmp_path / "three"
    run.mkdir()
    shutil.copy(trained / "config.yaml", run / "config.yaml")
    copy_checkpoints(trained, run, 4)
    run_processes(run, world=3)
    assert json.loads((run / "status.json").read_text())["world_size"] == 3
    # steps 6 and 8 as the uninterrupted two-process arm logged them, up to the sums' rounding
    assert logged_losses(run) == pytest.approx(logged_losses(trained)[2:], rel=1e-4)


def test_a_damaged_shard_is_found_by_the_process_that_checks_it_and_set_aside(trained, tmp_path, capfd):
    run = tmp_path / "damaged"
    run.mkdir()
    shutil.copy(trained / "config.yaml", run / "config.yaml")
    copy_checkpoints(trained, run, 4, 8)
    shard = RunDir(run).checkpoint(8) / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern mid-file: same size, other bytes
    shard.write_bytes(bytes(data))

    held = resumed_state(run, 2, tmp_path)
    assert held["step"] == 4  # the next older checkpoint, which verifies
    assert "dcp/__1_0.distcp does not match its checksum" in capfd.readouterr().err
    status = json.loads((run / "status.json").read_text())
    assert [s["step"] for s in status["set_aside"]] == [8] and not RunDir(run).checkpoint(8).exists()


def test_ablate_eval_scores_a_sharded_checkpoint_on_one_process_as_training_scored_it(trained, tmp_path):
    run = tmp_path / "rescore"
    run.mkdir()
    shutil.copy(trained / "config.yaml", run / "config.yaml")
    copy_checkpoints(trained, run, 4)
    job.rescore(run, 4)  # one process, no FSDP: whole tensors read from the two processes' shards
    assert metrics_by_step(run)[4]["val_loss"] == pytest.approx(
        metrics_by_step(trained)[4]["val_loss"], rel=1e-5
    )


def test_ablate_export_writes_a_sharded_checkpoint_as_the_folder_diffusers_loads(trained, tmp_path, capsys):
    """Step 4 holds shards only (no diffusers folder): `ablate export` reads them whole on one process,
    the EMA's shadows in place of the trained weights."""
    from ablate.cli import main

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: dcp\noutput_dir: {json.dumps(str(tmp_path / 'runs'))}\nbaseline: {{}}\n")
    copy_checkpoints(trained, tmp_path / "runs" / "baseline-s0", 4)
    step4 = RunDir(tmp_path / "runs" / "baseline-s0").checkpoint(4)
    out = tmp_path / "exported"
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(sweep), "baseline-s0", "--step", "4", "--out", str(out)])
    assert exit_.value.code == 0, capsys.readouterr().err
    assert f"exported baseline-s0 step 4 (EMA weights) to {out}" in capsys.readouterr().out

    model = PRXTransformer2DModel.from_pretrained(out / "transformer").state_dict()
    shadow, weights = sharded.read_whole(step4, "ema.shadow.prx."), sharded.read_whole(step4, "model.prx.")
    assert model.keys() == shadow.keys() == weights.keys()
    assert all(torch.equal(model[k], shadow[k]) for k in shadow)
    assert not all(torch.equal(shadow[k], weights[k]) for k in shadow)  # the EMA's, not the trained ones
    assert not (step4 / "transformer").exists() and checkpoint.verify(step4) is None  # read only
