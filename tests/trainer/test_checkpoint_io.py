"""How a checkpoint reaches the disk and comes back: staged and written in the background while training
goes on, hashed as written, readable by the run folder's readers, and loaded onto the trainer's device
whatever device saved it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading

import pytest
import torch
import xxhash
from safetensors.torch import load_file
from trainer_testing import TINY, crash_at, merge

import core.atomic
from core.rundir import RunDir
from trainer import job
from trainer.config import TrainConfig, load
from trainer.runtime import checkpoint, checksum, pretrained
from trainer.runtime.async_save import Stager, state_bytes
from trainer.runtime.dist import Dist
from trainer.train import Trainer

# torch.save tags each storage with the device it lives on, and torch.load puts it back there. This
# tagger (registered once: the registry cannot drop one) makes CPU storages read as saved from
# `_SAVED_ON["as"]`, as rank 0 of a DDP run on GPUs writes its optimizer state and EMA (cuda:0).
_SAVED_ON: dict[str, str | None] = {"as": None}
torch.serialization.register_package(
    -71,
    lambda s: _SAVED_ON["as"] if _SAVED_ON["as"] and s.device.type == "cpu" else None,
    lambda s, loc: None,
)


def small_state() -> tuple[dict, dict]:
    weights = {
        "prx.w": torch.randn(3, 5),
        "prx.h": torch.randn(7).to(torch.bfloat16),
        "factors.p": torch.ones(2),
    }
    return weights, {"optimizer": {"m": torch.arange(6.0)}, "step": 3}


def tensors_on(state) -> set[torch.device]:
    if isinstance(state, torch.Tensor):
        return {state.device}
    if isinstance(state, dict):
        return set().union(*map(tensors_on, state.values()))
    return set()


def test_resume_puts_state_saved_on_another_gpu_onto_the_trainers_own_device(make_run):
    """A state.pt whose tensors say cuda:3 (on this CPU machine torch.load alone refuses it) resumes
    through the real resume path, the optimizer's and the EMA's state on the trainer's device."""
    d = make_run(train={"steps": 8}, checkpoint={"every": 4, "keep": 5}, ema={"kind": "ema", "decay": 0.9})
    with crash_at(6), pytest.raises(KeyboardInterrupt):
        job.run(d)
    path = RunDir(d).checkpoint(4)
    saved = torch.load(path / "state.pt", weights_only=False)
    _SAVED_ON["as"] = "cuda:3"
    try:
        entry = checksum.write_torch(path / "state.pt", saved)
    finally:
        _SAVED_ON["as"] = None
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"]["state.pt"] = entry
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.verify(path) is None
    if torch.cuda.device_count() > 3:
        assert torch.load(path / "state.pt", weights_only=False)["ema"]["shadow"][
            "prx.x_embedder.weight"
        ].is_cuda
    else:  # what every process of a node did: load onto the device the state was saved from
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path / "state.pt", weights_only=False)

    tr = Trainer(load(d / "config.yaml"), d, Dist(0, 1, 0, torch.device("cpu")))
    tr.resume()
    assert tr.step == 4
    moments = [opt.state for opt in tr.optimizer.optimizers.values()]
    assert tensors_on(moments[0]) == tensors_on(tr.ema.shadow) == {tr.device}
    for name, shadow in tr.ema.shadow.items():
        assert torch.equal(shadow, saved["ema"]["shadow"][name])
    job.run(d)
    assert json.loads((d / "status.json").read_text())["state"] == "done"


def test_a_save_hashes_as_it_writes_and_reads_nothing_back(tmp_path, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("a save read a file back to hash it")

    monkeypatch.setattr(hashlib, "file_digest", no_reading)
    weights, state = small_state()
    path = checkpoint.save(RunDir(tmp_path), 3, b'{"a": 1}', weights, state, keep=2)
    monkeypatch.undo()
    files = json.loads((path / checkpoint.MANIFEST).read_text())["files"]
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    back = load_file(path / pretrained.WEIGHTS)  # safetensors' own reader
    assert back.keys() == {"w", "h"} and torch.equal(back["h"], weights["prx.h"])
    assert torch.equal(load_file(path / "factors.safetensors")["p"], weights["factors.p"])
    assert checkpoint.verify(path) is None


def test_a_manifest_of_sha256_checksums_still_verifies_and_still_catches_damage(tmp_path):
    weights, state = small_state()
    path = checkpoint.save(RunDir(tmp_path), 3, b"{}", weights, state, keep=2)
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"] = {
        name: {"size": len(data := (path / name).read_bytes()), "sha256": hashlib.sha256(data).hexdigest()}
        for name in manifest["files"]
    }
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.verify(path) is None
    data = bytearray((path / "state.pt").read_bytes())
    data[-40] ^= 1
    (path / "state.pt").write_bytes(bytes(data))
    assert checkpoint.verify(path) == "state.pt does not match its checksum"
    manifest["files"]["state.pt"] = {"size": len(data), "md5": "x"}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.verify(path).startswith("state.pt no checksum of a known algorithm")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_of_a_checkpoint_gets_the_mode_of_a_normal_file(tmp_path, monkeypatch, umask):
    """safetensors' own writer left the weights 0600: a teammate could not evaluate them."""
    previous = os.umask(umask)
    monkeypatch.setattr(core.atomic, "FILE_MODE", 0o666 & ~umask)  # read once at import, as the job does
    try:
        path = checkpoint.save(RunDir(tmp_path), 3, b"{}", *small_state(), keep=2)
    finally:
        os.umask(previous)
    files = [p for p in path.rglob("*") if p.is_file()]
    assert len(files) == 5
    assert {p.relative_to(path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files} == {
        p.relative_to(path).as_posix(): 0o666 & ~umask for p in files
    }


def test_staged_state_is_a_copy_that_training_cannot_change_and_its_buffers_are_reused():
    live = {"opt": {0: {"exp_avg": torch.zeros(4), "step": torch.tensor(1.0)}}, "groups": [{"lr": 0.1}]}
    stager = Stager()
    staged = stager.stage(live)
    live["opt"][0]["exp_avg"].add_(1)
    live["opt"][0]["step"] += 1
    live["groups"][0]["lr"] = 0.2
    assert staged == {"opt": {0: {"exp_avg": staged["opt"][0]["exp_avg"], "step": torch.tensor(1.0)}},
                      "groups": [{"lr": 0.1}]}  # fmt: skip
    assert torch.equal(staged["opt"][0]["exp_avg"], torch.zeros(4))
    again = stager.stage(live)
    assert again["opt"][0]["exp_avg"].data_ptr() == staged["opt"][0]["exp_avg"].data_ptr()
    assert torch.equal(again["opt"][0]["exp_avg"], torch.ones(4))


def gate_write_of(step: int, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """(reached, release): state.pt of checkpoint `step` is written once `release` is set; `reached` is
    set when its writer gets there (the other files are written by then)."""
    reached, release, real = threading.Event(), threading.Event(), checkpoint.write_torch

    def gated(path, obj):
        if path.parent == RunDir(path.parents[2]).checkpoint_tmp(step):
            reached.set()
            assert release.wait(timeout=120), "the test never released the write"
        return real(path, obj)

    monkeypatch.setattr(checkpoint, "write_torch", gated)
    return reached, release


def test_training_goes_on_while_a_save_is_written_and_the_newest_complete_one_is_kept(make_run, monkeypatch):
    """keep 1, saves at 2, 4, 6: while 4 is written, training runs steps 5 and 6 and checkpoint 2 stays
    (the only complete one); the save at 6 waits for 4, and each one deletes the one before it."""
    d = make_run(train={"steps": 6}, checkpoint={"every": 2, "keep": 1}, log={"every": 1})
    (reached, release), seen = gate_write_of(4, monkeypatch), {}
    real_step = Trainer.train_step

    def watching(self, step, batch):
        if step == 4:  # the 5th step: checkpoint 4 is being written
            assert reached.wait(timeout=120)
            run = RunDir(d)
            seen["complete"] = [p.name for p in checkpoint.complete(run)]
            seen["partial"] = [p.name for p in run.partial_checkpoints()]
            seen["in_flight"] = self.checkpointer.writer.in_flight
            release.set()
        return real_step(self, step, batch)

    monkeypatch.setattr(Trainer, "train_step", watching)
    job.run(d)
    assert seen == {"complete": ["step_00000002"], "partial": [".step_00000004.tmp"], "in_flight": True}
    assert [p.name for p in checkpoint.complete(d)] == ["step_00000006"]
    assert checkpoint.verify(checkpoint.latest(d)) is None


def test_a_save_that_fails_in_the_background_fails_the_arm_at_the_next_log_point(make_run, monkeypatch):
    d = make_run(train={"steps": 8}, checkpoint={"every": 4}, log={"every": 1})

    def full_disk(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "write_torch", full_disk)
    real_step = Trainer.train_step

    def after_the_write(self, step, batch):
        if step == 4:  # the write handed over at step 4 has ended (failed) before step 5's log point
            self.checkpointer.writer.thread.join()
        return real_step(self, step, batch)

    monkeypatch.setattr(Trainer, "train_step", after_the_write)
    with pytest.raises(OSError):
        job.run(d)
    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == f"disk full: {RunDir(d).checkpoint(4)}"
    assert [r.step for r in RunDir(d).log_rows()] == [1, 2, 3, 4]
    assert RunDir(d).partial_checkpoints() == [] and checkpoint.complete(d) == []


def test_a_checkpoints_projected_size_follows_the_model_precision_and_ema():
    """PRX-1.2B is 1.17 B parameters (DESIGN.md): fp32 weights, two AdamW moments in the weights' dtype,
    an fp32 EMA shadow when on."""
    prx = merge(TINY, {"model": {"preset": "prx-1.2b"}, "tokenizer": {"kind": "flux-vae"}})
    fp32 = state_bytes(TrainConfig.model_validate(prx))
    n = fp32.parameters
    assert round(n / 1e9, 2) == 1.17
    assert (fp32.weights, fp32.optimizer, fp32.ema, fp32.total) == (4 * n, 8 * n, 0, 12 * n)
    bf16 = state_bytes(
        TrainConfig.model_validate(merge(prx, {"precision": {"kind": "bf16"}, "ema": {"kind": "ema"}}))
    )
    assert (bf16.parameters, bf16.weights, bf16.optimizer, bf16.ema) == (n, 2 * n, 4 * n, 4 * n)
