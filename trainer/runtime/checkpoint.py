"""Checkpoints: written whole to a temporary folder, flushed, then renamed, so a folder named step_N is complete.

checkpoints/step_00000100/        (the name and place: core.rundir.RunDir.checkpoint)
    transformer/          as diffusers' save_pretrained writes it: loadable by PRXTransformer2DModel.from_pretrained
    factors.safetensors   parameters recipe factors add (REPA projector, SPRINT fusion, …)
    state.pt              step, optimizer(s), EMA, RNG states (torch, numpy, python, CUDA), data position,
                          throughput and timings so far
    manifest.json         size and checksum (XXH3-128; SHA-256 in older ones) of every other file, written last

A save stops the job only while the state is gathered and copied to host memory; the main process
writes the copy in a background thread (trainer/runtime/async_save.py), hashing each file as it is
written (trainer/runtime/checksum.py). The next save, the end of training and a stop signal wait for
the write in flight, so a requeued job finds either a complete checkpoint or a temporary folder.

A complete folder can still rot (a bad disk, a copy that stopped half-way, a user's editor): resume
and `ablate eval` use only checkpoints whose files match their manifest (`newest_verified`, which
checks the newest and goes further back only past one that fails); one that does not is moved to
checkpoints/.set-aside/ with a one-line warning, recorded in status.json (`set_aside`, and
`restarted_from_zero` when none was left), and the next older one is used. Resume loads
state.pt onto the CPU (memory-mapped: the processes of a node share its pages), whatever device
saved it, and each process moves what it keeps to its own device.

Pruning keeps the newest `keep` checkpoints, and the set-aside ones no older (by step) than the oldest
of those. Each folder deleted is first renamed out of sight (`RunDir.pruning`), so a kill during a
deletion never leaves a partial checkpoint under a complete name, nor more than `keep` of them;
the next start deletes what it left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file

from core.atomic import atomic_write_json, commit_dir, fsync_dir
from core.rundir import RunDir
from trainer.registry import Config
from trainer.runtime.async_save import Background, Stager, nbytes
from trainer.runtime.checksum import matches, write_bytes, write_safetensors, write_torch
from trainer.runtime.clock import Cadence


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


MANIFEST = "manifest.json"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"  # the file diffusers' from_pretrained reads


class CorruptCheckpoint(RuntimeError):
    """A checkpoint's files do not match its manifest; the message names it and says how."""


def _files(folder: Path) -> dict[str, Path]:
    """{relative path: path} of every file in `folder` but the manifest itself, sorted."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(folder).as_posix(): p for p in files}


def verify(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted, or None when every file matches its manifest."""
    try:
        recorded = json.loads((path / MANIFEST).read_bytes())["files"]
        expected = {str(name): dict(want, size=int(want["size"])) for name, want in recorded.items()}
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    present = _files(path)
    for name, want in expected.items():
        file = present.get(name)
        try:
            if file is None or file.is_symlink():
                return f"{name} missing"
            if (problem := matches(file, want)) is not None:
                return f"{name} {problem}"
        except OSError as e:
            return f"{name} unreadable ({e.strerror})"
    extra = sorted(set(present) - set(expected))
    return f"{extra[0]} is not in the manifest" if extra else None


def newest_verified(run: RunDir | Path, *, set_aside: bool = True) -> Path | None:
    """The newest checkpoint whose files match their manifest. Each newer one that fails is moved to
    checkpoints/.set-aside/ (with `set_aside`) and named in a one-line warning on stderr."""
    run = RunDir(run)
    for path in reversed(complete(run)):
        problem = verify(path)
        if problem is None:
            return path
        where = run.set_aside(path, problem) if set_aside else path
        print(
            f"warning: {path}: fails verification ({problem}); set aside as {where}",
            file=sys.stderr,
            flush=True,
        )
    return None


def clean_partial(run: RunDir | Path) -> list[Path]:
    """Delete the folders a killed save or deletion left (they hold no complete state)."""
    found = RunDir(run).partial_checkpoints()
    for tmp in found:
        shutil.rmtree(tmp, ignore_errors=True)
    return found


def prune(run: RunDir, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints, and the set-aside ones no older than the oldest of them."""
    for old in complete(run)[:-keep]:  # after a save: the newest complete one is never the one deleted
        _delete(run, old)
    oldest = min(run.checkpoint_steps(), default=None)
    for step, folder in run.set_aside_checkpoints():
        if oldest is not None and step < oldest:
            _delete(run, folder)


def _delete(run: RunDir, folder: Path) -> None:
    """Rename `folder` out of sight, then delete it: a kill half-way leaves a `.pruning-…` folder that no
    reader takes for a checkpoint (the next start deletes it), never a partial `step_N`."""
    target = run.pruning(folder)
    shutil.rmtree(target, ignore_errors=True)  # what a failed deletion of the same name left
    try:
        os.rename(folder, target)
        fsync_dir(target.parent)
    except OSError as e:
        print(f"warning: {folder}: not deleted ({e.strerror})", file=sys.stderr, flush=True)
        return
    shutil.rmtree(target, ignore_errors=True)


def save(run: RunDir, step: int, config: bytes, weights: dict, state: dict, keep: int) -> Path:
    """Write checkpoint `step` of `run` atomically and keep the newest `keep`. If writing fails (a full
    disk), the partial folder is removed at once, so the space is free for the error to be recorded.

    `config`: the transformer's config.json (`transformer_config`); `weights`: the denoiser's whole
    state dict (prx.…, factors.…) and `state` the rest, on the host (`Checkpointer.save` stages them)."""
    tmp = run.checkpoint_tmp(step)
    try:
        return _save(run, step, tmp, config, weights, state, keep)
    except BaseException as e:
        full = _nearly_full(tmp.parent)  # looked at before the partial folder frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename:
            raise
        if full or (isinstance(e, OSError) and e.errno == errno.ENOSPC):  # torch.save says RuntimeError
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run.checkpoint(step))) from e
        raise


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def check_room(run: RunDir, step: int, need: int) -> None:
    """Fail at once, before anything is written, when the disk has less room than the checkpoint's
    `need` bytes of tensors (a write in the background would fail later, steps later)."""
    folder = next(p for p in (run.checkpoints, run.path) if p.is_dir())
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run.checkpoint(step)))


def _part(weights: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def transformer_config(prx: torch.nn.Module) -> bytes:
    """The config.json diffusers' save_pretrained writes for `prx` (a sharded model cannot save itself):
    from a plain PRX built on the meta device, so nothing is allocated."""
    from diffusers import PRXTransformer2DModel

    with torch.device("meta"):
        plain = PRXTransformer2DModel.from_config(prx.config)
    return plain.to_json_string().encode()


def _save(run: RunDir, step: int, tmp: Path, config: bytes, weights: dict, state: dict, keep: int) -> Path:
    final = run.checkpoint(step)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "transformer").mkdir(parents=True)
    files = {  # each hashed as it is written
        "transformer/config.json": write_bytes(tmp / "transformer" / "config.json", config),
        # one file whatever the size (diffusers would split past 10 GB): `load` reads that file
        WEIGHTS: write_safetensors(tmp / WEIGHTS, _part(weights, "prx."), {"format": "pt"}),
        "factors.safetensors": write_safetensors(tmp / "factors.safetensors", _part(weights, "factors.")),
        "state.pt": write_torch(tmp / "state.pt", state),
    }
    atomic_write_json(tmp / MANIFEST, {"step": step, "files": dict(sorted(files.items()))})
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        _delete(run, final)
    commit_dir(tmp, final)
    prune(run, keep)
    return final


def complete(run: RunDir | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    run = RunDir(run)
    return [run.checkpoint(step) for step in run.checkpoint_steps()]


def latest(run: RunDir | Path) -> Path | None:
    found = complete(run)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict, dict]:
    """(the denoiser's whole state dict, the training state); trainer/runtime/parallel.py puts them in place."""
    prx = load_file(path / WEIGHTS)
    factors = load_file(path / "factors.safetensors")
    weights = {**{f"prx.{k}": v for k, v in prx.items()}, **{f"factors.{k}": v for k, v in factors.items()}}
    # onto the CPU whatever device saved it (a DDP run's cuda:0): every process of a node would
    # otherwise put the whole optimizer state and EMA on one GPU; mapped, so they share its pages
    return weights, torch.load(path / "state.pt", map_location="cpu", mmap=True, weights_only=False)


class CheckpointConfig(Config):
    every: int = Field(1000, ge=1, description="save every N steps (and at the end)")
    keep: int = Field(2, ge=1, description="newest complete checkpoints kept")


@dataclass(frozen=True)
class Held:
    """What a checkpoint holds besides the step: the denoiser (through its parallel layout), the optimizer
    and the EMA, and the processes that share them."""

    denoiser: torch.nn.Module
    parallel: Any
    optimizer: Any
    ema: Any
    dist: Any


class Checkpointer:
    """An arm's whole training state in its run folder: saved on its own cadence (`should_save`), restored
    from the newest checkpoint that verifies. Every process takes part (FSDP gathers sharded state);
    the main process writes and reads the folder, writing in the background (`writing`)."""

    def __init__(self, cfg: CheckpointConfig, run: RunDir, total_steps: int, seed: int, held: Held):
        self.cfg, self.run, self.seed, self.held = cfg, run, seed, held
        self.should_save = Cadence(cfg.every, total_steps)
        self.stager, self.writer = Stager(), Background()
        self.transformer_json: bytes | None = None  # the transformer's config.json, made at the first save

    def save(self, step: int, timing: dict) -> None:
        """Gather the state, copy it to host memory and hand it to the background writer (after the
        previous write is done); training goes on while it is written."""
        held = self.held
        self.writer.wait()  # one write at a time; a failed one raises here
        weights = held.parallel.weights()
        optimizer = held.parallel.optimizer_state(held.optimizer)
        ema = held.parallel.ema_state(held.ema)
        if held.dist.main:
            state = {"optimizer": optimizer, "ema": ema, "data": {"seed": self.seed, "step": step},
                     "timing": timing, "step": step, "rng": rng_state()}  # fmt: skip
            weights, state = self.stager.stage((weights, state))
            check_room(self.run, step, nbytes((weights, state)))
            self.transformer_json = self.transformer_json or transformer_config(held.denoiser.prx)
            self.writer.submit(
                partial(save, self.run, step, self.transformer_json, weights, state, self.cfg.keep)
            )
        held.dist.wait_for_main()  # the main process staged the state alone

    def check(self) -> None:
        """Raise a background write's error (a full disk) if it has failed; never waits."""
        self.writer.check()

    def wait(self) -> None:
        """Until every save handed to the background is on disk, on every process."""
        self.writer.wait()
        self.held.dist.wait_for_main()  # the main process writes alone

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around the training loop: the save in flight is on disk when it ends, however it ends (a
        checkpoint of a consistent state is worth finishing after a crash too)."""
        try:
            yield
        except BaseException:
            try:
                self.writer.wait()
            except BaseException as e:  # the loop's own error is the one to report
                print(f"warning: {self.run.path}: the checkpoint being written failed too: {e}",
                      file=sys.stderr, flush=True)  # fmt: skip
            raise
        self.wait()

    def resume(self, note: Callable[[str], None]) -> tuple[int, dict | None]:
        """(step, timing) of the newest checkpoint that verifies, its state put in place; (0, None) when
        there is none. Temporary folders of a killed save are deleted, checkpoints that fail
        verification set aside."""
        held, path = self.held, None
        if held.dist.main:
            for tmp in clean_partial(self.run):
                note(f"removed {tmp.name}, left by a killed save or deletion")
            existed = complete(self.run)
            path = newest_verified(self.run)
            if path is None and existed:
                self.run.update_status(restarted_from_zero=True)
                print(f"warning: {self.run.path}: no checkpoint verifies; training starts again from step 0",
                      file=sys.stderr, flush=True)  # fmt: skip
        path = held.dist.broadcast_object(path)
        if path is None:
            return 0, None
        weights, state = load(path)
        held.parallel.load_weights(weights)
        held.parallel.load_optimizer_state(held.optimizer, state["optimizer"])
        held.parallel.load_ema_state(held.ema, state["ema"])
        set_rng_state(state["rng"])
        note(f"resumed from {path.name}")
        return state["step"], state.get("timing", {})

    def load_weights(self, step: int | None) -> int:
        """Put checkpoint `step`'s weights (default: the newest that verifies) and EMA in place, for
        evaluating it again; returns its step."""
        run = self.run
        path = run.checkpoint(step) if step is not None else None
        if step is None:  # one process verifies (and sets aside): the others take its answer
            path = self.held.dist.broadcast_object(newest_verified(run) if self.held.dist.main else None)
        if path is None or not path.exists():
            kept = ", ".join(map(str, run.checkpoint_steps())) or "none"
            raise FileNotFoundError(
                f"{run.path}: no {'verified ' if step is None else ''}checkpoint at step "
                f"{step if step is not None else '(any)'}; checkpoints kept: {kept}"
            )
        if step is not None and (problem := verify(path)) is not None:
            raise CorruptCheckpoint(f"{path}: fails verification ({problem})")
        weights, state = load(path)
        self.held.parallel.load_weights(weights)
        self.held.parallel.load_ema_state(self.held.ema, state["ema"])
        return state["step"]

    def newest_kept(self) -> str:
        """The newest checkpoint that verifies, by name, for an error message ('none' when there is none)."""
        kept = newest_verified(self.run, set_aside=False)
        return kept.name if kept else "none"
