"""FSDP2 (`parallel: {kind: fsdp}`) on two CPU processes (gloo), each running the real trainer job."""

import json
import shutil

import pytest
import torch
from diffusers import PRXTransformer2DModel
from pydantic import ValidationError
from safetensors.torch import load_file
from trainer_testing import TINY, logged_losses, merge, metrics_by_step, run_processes

from ablate.sweep.diagnostics import to_user_error
from core.rundir import RunDir
from trainer.config import TrainConfig, describe_registries
from trainer.runtime import checkpoint, sharded
from trainer.runtime.parallel import lockstep

# EMA on, clipping active (grad norms here are 0.6-2), and 9 held-out items in chunks of 4: rank 0
# runs two forwards, rank 1 one and a throw-away one (under FSDP every forward needs both ranks).
TWO_RANKS = dict(
    train={"steps": 8, "batch_size": 8, "grad_clip": 0.5},
    data={"num_val": 9},
    eval={"every": 2, "batch_size": 4},  # between checkpoints too: a save reshards anyway
    ema={"kind": "ema", "decay": 0.9},
)
# PRX's setting: every block stays gathered after an eval forward, with the EMA's weights in it, until
# the trainer drops them (Sharded.evaluation); a stale gather would show in the losses after step 2
FSDP = {"kind": "fsdp", "reshard_after_forward": False}


def log(run_dir, key):
    return [json.loads(line)[key] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def final_state(run_dir):
    """The last checkpoint's PRX weights and training state, whichever kind it is."""
    ckpt = checkpoint.latest(run_dir)
    if sharded.is_sharded(ckpt):
        weights, state = sharded.read_state(ckpt)
        return {k.removeprefix("prx."): v for k, v in weights.items() if k.startswith("prx.")}, state
    weights = load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")
    return weights, torch.load(ckpt / "state.pt", weights_only=False)


def test_fsdp_matches_ddp_resumes_exactly_and_saves_a_diffusers_model(make_run):
    """Three two-process jobs: DDP, FSDP, and FSDP again from the FSDP run's checkpoint 4."""
    ddp = make_run("ddp", **TWO_RANKS)
    fsdp = make_run("fsdp", **TWO_RANKS, parallel=FSDP)
    resumed = make_run("resumed", **TWO_RANKS, parallel=FSDP)

    run_processes(ddp)
    run_processes(fsdp)
    # a job killed after checkpoint 4: its folder holds that checkpoint; the job starts again
    shutil.copytree(checkpoint.complete(fsdp)[0], RunDir(resumed).checkpoint(4))
    run_processes(resumed)
    for run in (ddp, fsdp, resumed):
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "done" and status["world_size"] == 2

    # FSDP = DDP: the same losses, clipped grad norms and held-out losses (EMA weights), fp32 on both
    assert logged_losses(fsdp) == pytest.approx(logged_losses(ddp), rel=1e-4)
    assert log(fsdp, "grad_norm") == pytest.approx(log(ddp, "grad_norm"), rel=1e-4)
    assert min(log(ddp, "grad_norm")) > 0.5  # clipping acted at every logged step
    va, vb = metrics_by_step(ddp), metrics_by_step(fsdp)
    for step in (2, 4, 6, 8):
        assert vb[step]["val_loss"] == pytest.approx(va[step]["val_loss"], rel=1e-4)
    (wa, _), (wb, sb) = final_state(ddp), final_state(fsdp)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
    assert set(sb["optimizer"]["adamw"]["state"]) == {f"prx.{k}" for k in wa}  # FSDP keys it by name

    # resumed from checkpoint 4 = uninterrupted: weights, optimizer state, EMA and the later losses
    wc, sc = final_state(resumed)
    assert all(torch.equal(wc[k], wb[k]) for k in wb)
    for name, moments in sb["optimizer"]["adamw"]["state"].items():
        for k, v in moments.items():
            assert torch.equal(sc["optimizer"]["adamw"]["state"][name][k], v), (name, k)
    for name, v in sb["ema"]["shadow"].items():
        assert torch.equal(sc["ema"]["shadow"][name], v) and v.shape == wb[name.removeprefix("prx.")].shape
    assert logged_losses(resumed) == logged_losses(fsdp)[2:]  # steps 6, 8

    # the final checkpoint is a plain diffusers model with fp32 (master) weights
    model = PRXTransformer2DModel.from_pretrained(checkpoint.latest(fsdp) / "transformer")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.state_dict()["final_layer.linear.weight"], wb["final_layer.linear.weight"])


def test_muon_under_fsdp_matches_ddp_and_resumes_exactly(make_run):
    """`optimizer: muon` with `parallel: fsdp` (FSDPMuon: momentum sharded, whole matrices only for
    Newton–Schulz) on two processes: the losses and weights of DDP's Muon, and a resume from
    checkpoint 4 that continues bit for bit, its Muon and AdamW state saved and loaded through the
    checkpoint."""
    muon = {"optimizer": {"kind": "muon", "lr": 0.02, "weight_decay": 0.1, "adam_lr": 1e-3}}
    ddp = make_run("ddp", **muon)
    fsdp = make_run("fsdp", **muon, parallel=FSDP)
    resumed = make_run("resumed", **muon, parallel=FSDP)

    run_processes(ddp, fsdp)
    shutil.copytree(checkpoint.complete(fsdp)[0], RunDir(resumed).checkpoint(4))
    run_processes(resumed)
    for run in (ddp, fsdp, resumed):
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "done" and status["world_size"] == 2

    # The same losses as DDP's Muon. Not the same weights elementwise: the gradients differ in fp32
    # rounding (~1e-8) from step 2, which flips some bf16 casts before Newton–Schulz, and its quintic
    # amplifies those in the small singular directions (~1e-3 in the weights by step 3; bitwise equal
    # before). Given the same gradients FSDPMuon is torch's Muon bit for bit (test_optim.py).
    losses = logged_losses(fsdp)
    assert losses == pytest.approx(logged_losses(ddp), rel=1e-4) and losses[0] != losses[-1]
    (wa, _), (wb, sb) = final_state(ddp), final_state(fsdp)
    # both groups in the checkpoint, keyed by name: Muon's 2-D block weights, AdamW's the rest
    muon_state, adamw_state = sb["optimizer"]["muon"]["state"], sb["optimizer"]["adamw"]["state"]
    assert "prx.blocks.0.attention.img_qkv_proj.weight" in muon_state
    assert set(muon_state) | set(adamw_state) == {f"prx.{k}" for k in wa}

    wc, sc = final_state(resumed)
    assert all(torch.equal(wc[k], wb[k]) for k in wb)
    for group in ("muon", "adamw"):
        for name, moments in sb["optimizer"][group]["state"].items():
            for k, v in moments.items():
                assert torch.equal(sc["optimizer"][group]["state"][name][k], v), (group, name, k)
    assert logged_losses(resumed) == losses[2:]  # steps 6, 8


def test_lockstep_pads_every_process_to_the_busiest_ones_chunk_count():
    # 9 items over 2 processes in chunks of 4: rank 0 holds 5 (2 chunks), rank 1 holds 4 (1 + padding)
    assert list(lockstep([0, 2, 4, 6, 8], 4, 9, 2)) == [([0, 2, 4, 6], True), ([8], True)]
    assert list(lockstep([1, 3, 5, 7], 4, 9, 2)) == [([1, 3, 5, 7], True), ([0], False)]
    assert list(lockstep([], 4, 1, 2)) == [([0], False)]  # fewer items than processes
    assert list(lockstep(list(range(5)), 4, 5, 1)) == [([0, 1, 2, 3], True), ([4], True)]


def config_error(over: dict) -> str:
    """The one line `ablate run` prints for a baseline with `over` applied."""
    data = merge(TINY, over)
    with pytest.raises(ValidationError) as e:
        TrainConfig.model_validate(data)
    where = lambda path: (None, None, ".".join(map(str, path)))  # noqa: E731
    return str(to_user_error(e.value, data, TrainConfig, where, describe_registries()))


def test_fsdp_config_takes_muon_and_refuses_bad_hybrid_values_in_one_line():
    both = TrainConfig.model_validate(merge(TINY, {"optimizer": {"kind": "muon"}, "parallel": FSDP}))
    assert (both.optimizer.kind, both.parallel.kind) == ("muon", "fsdp")
    line = config_error({"parallel": {"kind": "fsdp", "hybrid": 0}})
    assert line == "parallel.hybrid: got 0; expected a valid boolean or greater than 0"
    hsdp = TrainConfig.model_validate(merge(TINY, {"parallel": {"kind": "fsdp", "hybrid": 2}}))
    assert hsdp.parallel.hybrid == 2
    assert TrainConfig.model_validate(TINY).parallel.kind == "ddp"  # the default: today's behaviour


def test_bf16_gathers_keep_fp32_shards(tmp_path):
    """One process, one-rank gloo group: the real fully_shard and mixed-precision policy (the CUDA
    default under autocast), which CPU runs of the trainer leave off."""
    from torch.distributed.device_mesh import init_device_mesh

    from trainer.factors.precision import Precision
    from trainer.model import Denoiser, ModelConfig, build_prx
    from trainer.runtime.parallel import FSDPConfig, shard

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        den = Denoiser(build_prx(ModelConfig(preset="tiny"), 3, 32))
        shard(den, init_device_mesh("cpu", (1,)), FSDPConfig(), Precision(torch.float32, True, "cpu"))
        seen = []
        qkv = den.prx.blocks[0].attention.img_qkv_proj
        qkv.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = den(torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 5, 32), None)
        out.pred.float().square().mean().backward()
        assert seen == [torch.bfloat16]  # gathered for compute in bf16; shards and their gradients fp32
        assert {p.dtype for p in den.parameters()} == {p.grad.dtype for p in den.parameters()}
        assert {p.dtype for p in den.parameters()} == {torch.float32}
    finally:
        torch.distributed.destroy_process_group()


def test_a_bf16_projector_is_an_fsdp_unit_of_its_own_beside_fp32_shards(tmp_path):
    """FSDP holds one dtype per unit: REPA's bf16 projector (PRX's storage) is sharded apart from the
    fp32 root, and stays bf16 with its gradients. One process, one-rank gloo group, autocast as on CUDA."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from trainer.factors.precision import Precision
    from trainer.factors.repa import REPAConfig, build_repa
    from trainer.model import Denoiser, FactorContext, ModelConfig, build_prx
    from trainer.runtime.parallel import FSDPConfig, shard

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        ctx = FactorContext(
            hidden_size=64, depth=4, patch_size=2, resolution=16, downsample=1, device=torch.device("cpu")
        )
        repa = build_repa(REPAConfig(teacher={"kind": "tiny"}, block=1, projector_dtype="bf16"), ctx)
        den = Denoiser(build_prx(ModelConfig(preset="tiny"), 3, 32), [repa]).to("cpu", torch.float32).train()
        shard(den, init_device_mesh("cpu", (1,)), FSDPConfig(), Precision(torch.float32, True, "cpu"))
        assert isinstance(repa.projector, FSDPModule)
        images = torch.rand(2, 3, 16, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = den(
                images * 2 - 1,
                torch.rand(2),
                torch.randn(2, 5, 32),
                None,
                inputs={"images": images, "step": 0},
            )
        (out.pred.float().square().mean() + out.losses["repa"]).backward()
        dtypes = {n: (p.dtype, p.grad.dtype) for n, p in den.named_parameters()}
        assert {d for n, d in dtypes.items() if ".projector." in n} == {(torch.bfloat16, torch.bfloat16)}
        assert {d for n, d in dtypes.items() if ".projector." not in n} == {(torch.float32, torch.float32)}
    finally:
        torch.distributed.destroy_process_group()


def test_meta_init_shards_equal_a_whole_build_and_no_process_holds_the_whole_model(tmp_path):
    """Two gloo processes: the PRX built on the meta device, sharded, then materialised layer by layer
    equals a whole build of the same seed bit for bit (fp32 and bf16 weights, factors after it
    included), trains to the same first losses, and never takes a whole model's memory."""
    import meta_init_worker

    world = 2
    args = (world, str(tmp_path / "init"), str(tmp_path))
    # spawn: the workers train, and autograd refuses a fork once the test process has run a backward
    torch.multiprocessing.start_processes(meta_init_worker.run, args=args, nprocs=world, start_method="spawn")
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for dtype, (mine, full) in got["equal"].items():
            assert got["was_meta"][dtype] and got["rng"][dtype], dtype  # the factors after it draw the same
            assert [n for n, ok in mine.items() if not ok] == [], (rank, dtype)
            assert [n for n, ok in full.items() if not ok] == [], (rank, dtype)
            assert any(n.startswith("factors.") for n in mine) and len(mine) > 40
        assert got["shard_of_whole"]
        whole, meta = got["losses"]
        assert meta == whole and whole[0] != whole[1]  # bit for bit, and training moved
        # memory: the control shows the measure sees a whole build; a meta build takes about half
        # (this process's shard) and holds one layer whole at a time
        full = got["full_bytes"]
        assert got["whole_growth"] > 0.9 * full, got
        assert got["meta_growth"] < 0.7 * full, got
        assert got["largest"] < full / 8
