"""Execution settings for models past one GPU's memory: activation checkpointing (`train.activation_checkpointing`),
gradient accumulation (`train.micro_batch_size`) and the collective timeouts. Each changes how a step runs,
never what it computes: the same losses as without, at one process and at two (gloo, forked)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainer_testing import TINY, crash_at, logged_losses, merge, run_processes

import trainer.runtime.compile as compile_mod
from trainer import job
from trainer.config import TrainConfig, identity
from trainer.draws import Draws
from trainer.runtime import checkpoint
from trainer.runtime.dist import Dist
from trainer.train import Trainer

TEACHER = {"kind": "tiny", "width": 16, "layers": 1, "heads": 2, "patch_size": 2}
# TREAD through blocks 1-2 (draws per sample in a hook between blocks), REPA reading block 1's output inside
# the route, contrastive negatives in global groups of 2: every kind of hook and every batch-wide term
FACTORS = {
    "routing": {"kind": "tread", "start": 1, "end": 3},
    "repa": {"kind": "repa", "block": 1, "teacher": TEACHER},
    "contrastive": {"kind": "contrastive", "group": 2},
}
COMMON = {
    "model": {"init": "diffusers"},  # a random final layer: every block's gradient is non-zero at once
    "optimizer": {"kind": "adamw", "lr": 1e-2},
    "train": {"steps": 3, "batch_size": 8, "warmup_steps": 0, "caption_dropout": 0.5},
    "log": {"every": 1, "wandb": {"mode": "disabled"}},
    "checkpoint": {"every": 3},
    "eval": {"every": 3},
}


def logged(run_dir, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def trainer(tmp_path, name: str, over: dict) -> Trainer:
    (tmp_path / name).mkdir()
    cfg = TrainConfig.model_validate(merge(merge(TINY, COMMON), over))
    return Trainer(cfg, tmp_path / name, Dist(0, 1, 0, torch.device("cpu")))


def loss_and_grads(tr: Trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Step 0's loss, every parameter's gradient, and how many tensors autograd kept for the backward."""
    batch = next(iter(tr.loader()))
    kept = 0

    def pack(x):
        nonlocal kept
        kept += 1
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = tr.loss(0, batch, Draws.of_rank(tr.cfg.seed, 0, 0, len(batch["caption"])))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tr.denoiser.named_parameters() if p.grad is not None}
    return loss.detach(), grads, kept


def test_checkpointed_blocks_recompute_the_same_loss_and_gradients_through_routing_and_repa(tmp_path):
    plain = loss_and_grads(trainer(tmp_path, "plain", FACTORS))
    ckpt_tr = trainer(tmp_path, "ckpt", {**FACTORS, "train": {"activation_checkpointing": True}})
    ckpt = loss_and_grads(ckpt_tr)
    assert ckpt[2] < plain[2] / 2  # the blocks' activations were not kept: recomputed in backward
    assert torch.equal(ckpt[0], plain[0])  # the routed tokens and REPA's target were drawn once
    assert plain[1].keys() == ckpt[1].keys() and any("projector" in n for n in plain[1])  # REPA's too
    for n, g in plain[1].items():  # the recomputation replays the forward exactly
        assert torch.equal(ckpt[1][n], g), n
    # in place: the parameter names (checkpoints, EMA, optimizer groups) are those without checkpointing
    names = [n for n, _ in ckpt_tr.denoiser.named_parameters()]
    assert names == [n for n, _ in trainer(tmp_path, "names", FACTORS).denoiser.named_parameters()]


def test_checkpointed_blocks_compile_in_torchtitans_order(tmp_path, monkeypatch):
    """Checkpointing, then compile per block (CPU: aot_eager, as tests/trainer/test_compile.py)."""
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    try:
        plain = loss_and_grads(trainer(tmp_path, "plain", FACTORS))
        over = {**FACTORS, "train": {"activation_checkpointing": True, "compile": "on"}}
        both = loss_and_grads(trainer(tmp_path, "both", over))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(both[0], plain[0], rtol=1e-5, atol=0)
    for n, g in plain[1].items():
        torch.testing.assert_close(both[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


# -- the trainer, at one process and at two -----------------------------------------------------------------
VARIANTS = {  # name → train overrides at (1 process, 2 processes): micro-batches of half a process's rows
    "plain": ({}, {}),
    "checkpointed": ({"activation_checkpointing": True}, {"activation_checkpointing": True}),
    "micro": ({"micro_batch_size": 4}, {"micro_batch_size": 2}),
}
TIMEOUTS = {"collective_timeout_s": 123, "collective_timeout_long_s": 456}  # the micro runs' (any would do)
CASES = {"factors": FACTORS, "fsdp": {"parallel": {"kind": "fsdp"}}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple, object]:
    root = tmp_path_factory.mktemp("accumulation")
    dirs = {}
    for case, over in CASES.items():
        for variant, per_world in VARIANTS.items():
            for world in (1, 2):
                d = root / f"{case}-{variant}-{world}"
                d.mkdir()
                train = {**per_world[world - 1], **(TIMEOUTS if variant == "micro" else {})}
                cfg = merge(merge(merge(TINY, COMMON), over), {"train": train})
                d.joinpath("config.yaml").write_text(yaml.safe_dump(cfg))
                dirs[case, variant, world] = d
    for (_, _, world), d in dirs.items():
        if world == 1:
            job.run(d)
    real = Trainer.train_loop

    def noting_timeouts(self):  # what the job's process groups were made with (the forked tasks inherit it)
        from torch.distributed import distributed_c10d as c10d

        cpu = torch.device("cpu")
        groups = {"default": c10d._get_default_group(), "long": self.dist.long}
        found = {k: g._get_backend(cpu).options._timeout.total_seconds() for k, g in groups.items()}
        (self.recorder.run.path / f"timeouts-{self.dist.rank}.json").write_text(json.dumps(found))
        return real(self)

    Trainer.train_loop = noting_timeouts
    try:
        run_processes(*(d for (_, _, world), d in dirs.items() if world == 2))
    finally:
        Trainer.train_loop = real
    return dirs


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_and_micro_batches_log_the_losses_without_them(runs, case, world):
    plain = logged_losses(runs[case, "plain", world])
    checkpointed = logged_losses(runs[case, "checkpointed", world])
    micro = logged_losses(runs[case, "micro", world])
    print(f"{case} at {world}: plain {plain}, checkpointed {checkpointed}, micro-batches {micro}")
    assert len(plain) == 3
    assert checkpointed == plain  # the same arithmetic, recomputed: bitwise on CPU
    # the gradient summed in two halves: rounding only; the norm before clipping shows an unscaled half
    # (AdamW's update would hide it) and an unsynced one moves the losses of two processes
    assert micro == pytest.approx(plain, rel=1e-5, abs=0)
    assert micro == pytest.approx(logged_losses(runs[case, "plain", 1]), rel=1e-5, abs=0)  # and 1 process
    norms = [logged(runs[case, v, world], "grad_norm") for v in ("plain", "micro")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5, abs=0)
    status = json.loads((runs[case, "micro", world] / "status.json").read_text())
    assert status["state"] == "done" and status["world_size"] == world
    if world == 2:  # the config's timeouts reached the job's process groups
        for rank in (0, 1):
            found = json.loads((runs[case, "micro", 2] / f"timeouts-{rank}.json").read_text())
            assert found == {"default": 123.0, "long": 456.0}


def test_a_run_with_micro_batches_and_checkpointing_resumes_bitwise_identical(make_run):
    over = dict(train={"steps": 6, "micro_batch_size": 2, "activation_checkpointing": True},
                checkpoint={"every": 2, "keep": 5}, routing=FACTORS["routing"])  # fmt: skip
    straight, resumed = make_run("straight", **over), make_run("resumed", **over)
    job.run(straight)
    with crash_at(3), pytest.raises(KeyboardInterrupt):  # killed after checkpoint 2
        job.run(resumed)
    job.run(resumed)

    def weights(d):
        return load_file(checkpoint.latest(d) / "transformer" / "diffusion_pytorch_model.safetensors")

    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(resumed)[-2:] == logged_losses(straight)[-2:]


# -- the config ----------------------------------------------------------------------------------------------
def test_micro_batches_that_split_a_process_share_or_a_contrastive_group_are_refused_in_one_line():
    cfg = TrainConfig.model_validate(merge(TINY, {"train": {"batch_size": 8, "micro_batch_size": 3}}))
    assert cfg.world_problems(2, 2) == [(
        ("train", "micro_batch_size"),
        "train.micro_batch_size 3 does not divide the per-process batch 4 (train.batch_size 8 over 2 processes)",
        "a divisor of 4",
    )]  # fmt: skip
    assert TrainConfig.model_validate(merge(TINY, {"train": {"batch_size": 8, "micro_batch_size": 2}})).world_problems(2, 2) == []  # fmt: skip
    over = {
        "train": {"batch_size": 8, "micro_batch_size": 2},
        "contrastive": {"kind": "contrastive", "group": 4},
    }
    ((key, problem, expected),) = TrainConfig.model_validate(merge(TINY, over)).world_problems(1, 1)
    assert key == ("contrastive", "group") and expected == "a divisor of 2"
    assert problem == ("contrastive.group 4 does not divide the micro-batch 2 (train.micro_batch_size), so its "
                       "groups would span micro-batches")  # fmt: skip


def test_the_execution_settings_leave_the_arms_hash_alone():
    base = TrainConfig.model_validate(TINY).model_dump(mode="json")
    other = TrainConfig.model_validate(
        merge(
            TINY,
            {
                "train": {
                    "activation_checkpointing": True,
                    "micro_batch_size": 2,
                    "collective_timeout_s": 60,
                    "collective_timeout_long_s": 7200,
                }
            },
        )  # fmt: skip
    ).model_dump(mode="json")
    assert identity(other).hash == identity(base).hash
    assert identity(other).eval_hash == identity(base).eval_hash


# -- the collective timeouts ---------------------------------------------------------------------------------
def _timeouts_task(rank: int, port: int, out: str) -> None:
    """One of two processes: set up as a job does, then a main-only phase three times the short timeout."""
    from torch.distributed import distributed_c10d as c10d

    from trainer.runtime import dist as distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))  # fmt: skip
    d = distributed.init(timeout_s=1, long_timeout_s=60)
    cpu = torch.device("cpu")
    found = {
        "default": c10d._get_default_group()._get_backend(cpu).options._timeout.total_seconds(),
        "long": d.long._get_backend(cpu).options._timeout.total_seconds(),
    }
    if d.main:
        time.sleep(3)  # the phase only the main process runs (a checkpoint's write), longer than 1 s
    d.wait_for_main()
    if d.main:
        time.sleep(3)  # verifying a checkpoint before telling the others which
    found["broadcast"] = d.broadcast_object("step_2" if d.main else None)
    # the same wait on the default group: the short timeout ends it (rank 0 waits until rank 1 saw it fail)
    failed = os.path.join(out, "failed")
    if d.main:
        deadline = time.monotonic() + 60
        while not os.path.exists(failed) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        try:
            torch.distributed.barrier()
        except RuntimeError as e:
            found["default_barrier"] = str(e).splitlines()[0]
        open(failed, "w").close()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(found, f)


def test_the_timeouts_reach_the_process_groups_and_the_main_only_phases_wait_under_the_long_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(
        _timeouts_task, args=(port, str(tmp_path)), nprocs=2, start_method="fork"
    )
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for found in (r0, r1):
        assert (found["default"], found["long"], found["broadcast"]) == (1.0, 60.0, "step_2")
    assert "timed out" in r1["default_barrier"].lower() or "timeout" in r1["default_barrier"].lower()
