"""Checkpoints: written whole to a temporary folder, flushed, then renamed, so a folder named step_N is complete.

checkpoints/step_00000100/        (the name and place: core.rundir.RunDir.checkpoint)
    transformer/          as diffusers' save_pretrained writes it: loadable by PRXTransformer2DModel.from_pretrained
    factors.safetensors   parameters recipe factors add (REPA projector, SPRINT fusion, …)
                          (these two: trainer/runtime/pretrained.py)
    state.pt              step, optimizer(s), EMA, RNG states (torch, numpy, python, CUDA), data position,
                          throughput and timings so far
    manifest.json         size and checksum (XXH3-128; SHA-256 in older ones) of every other file, written last

That is a whole checkpoint, which one process writes: what DDP and one-process arms save. An FSDP arm on
several processes saves a sharded one instead (trainer/runtime/sharded.py: every process writes its
own shards with torch.distributed.checkpoint, and nothing is gathered); either kind resumes either
kind, at any world size.

A save stops the job only while the state is copied to host memory; the copy is written in a
background thread (trainer/runtime/async_save.py), each file hashed as it is written
(trainer/runtime/checksum.py). The next save, the end of training and a stop signal wait for the
write in flight, so a requeued job finds either a complete checkpoint or a temporary folder.

A complete folder can still rot (a bad disk, a copy that stopped half-way, a user's editor): resume
and `ablate eval` use only checkpoints whose files match their manifest (the processes share the
files to check out between them; the newest is checked, and an older one only past one that fails);
one that does not is moved to checkpoints/.set-aside/ with a one-line warning, recorded in
status.json (`set_aside`, and `restarted_from_zero` when none was left), and the next older one is
used. Resume loads state.pt onto the CPU (memory-mapped: the processes of a node share its pages),
whatever device saved it, and each process moves what it keeps to its own device.

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

from core.atomic import atomic_write_json, commit_dir, fsync_dir
from core.rundir import RunDir
from trainer.registry import Config
from trainer.runtime import pretrained
from trainer.runtime.async_save import Background, Stager, nbytes
from trainer.runtime.checksum import matches, write_torch
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
STATE = "state.pt"  # the training state besides the tensors DCP or the diffusers folder hold


def load_state(checkpoint: Path) -> dict:
    """A checkpoint's state.pt, onto the CPU whatever device saved it (a DDP run's cuda:0: every process
    of a node would otherwise put the whole optimizer state and EMA on one GPU), memory-mapped so the
    processes of a node share its pages."""
    return torch.load(checkpoint / STATE, map_location="cpu", mmap=True, weights_only=False)


class CorruptCheckpoint(RuntimeError):
    """A checkpoint's files do not match its manifest; the message names it and says how."""


def _files(folder: Path) -> dict[str, Path]:
    """{relative path: path} of every file in `folder` but the manifest itself, sorted."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(folder).as_posix(): p for p in files}


def verify(path: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why checkpoint `path` cannot be trusted, or None when every file matches its manifest. With
    `share` (k, n), the files' contents checked are every n-th from the k-th (each of n processes
    checking its share); which files there are is checked whole."""
    try:
        recorded = json.loads((path / MANIFEST).read_bytes())["files"]
        expected = {str(name): dict(want, size=int(want["size"])) for name, want in recorded.items()}
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    present = _files(path)
    for i, (name, want) in enumerate(sorted(expected.items())):
        file = present.get(name)
        try:
            if file is None or file.is_symlink():
                return f"{name} missing"
            if i % share[1] == share[0] and (problem := matches(file, want)) is not None:
                return f"{name} {problem}"
        except OSError as e:
            return f"{name} unreadable ({e.strerror})"
    extra = sorted(set(present) - set(expected))
    return f"{extra[0]} is not in the manifest" if extra else None


def newest_verified(
    run: RunDir | Path,
    *,
    set_aside: bool = True,
    problem_of: Callable[[Path], str | None] = verify,
    candidates: list[Path] | None = None,
    main: bool = True,
) -> Path | None:
    """The newest checkpoint (of `candidates`, default the run's complete ones) whose files match their
    manifest (`problem_of`: why one does not). Each newer one that fails is moved to
    checkpoints/.set-aside/ (with `set_aside`) and named in a one-line warning on stderr, by the `main`
    process only (the others take part in `problem_of`, which may be collective)."""
    run = RunDir(run)
    for path in reversed(complete(run) if candidates is None else candidates):
        problem = problem_of(path)
        if problem is None:
            return path
        if main:
            what = f"set aside as {run.set_aside(path, problem)}" if set_aside else "skipped, left in place"
            print(f"warning: {path}: fails verification ({problem}); {what}", file=sys.stderr, flush=True)
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
    """Write whole checkpoint `step` of `run` atomically and keep the newest `keep`.

    `config`: the transformer's config.json (`pretrained.transformer_config`); `weights`: the denoiser's
    whole state dict (prx.…, factors.…) and `state` the rest, on the host (`Checkpointer.save` stages them)."""

    def files(tmp: Path) -> dict:
        shutil.rmtree(tmp, ignore_errors=True)
        return {**pretrained.write(tmp, config, weights), STATE: write_torch(tmp / STATE, state)}

    return _saved(run, step, keep, files)


def save_sharded(run: RunDir, step: int, state: dict, dist: Any, mine: dict | None, keep: int) -> Path | None:
    """Sharded checkpoint `step` of `run` (trainer/runtime/sharded.py), on every process: each writes
    its part of `state` (its shards) into the folder the main process has emptied; the main process
    then writes `mine` ({"state": state.pt's contents} and, at the last step, "config" and "weights"
    for the diffusers folder) and the manifest of every process's files, and renames the folder."""

    from trainer.runtime import sharded  # with torch.distributed.checkpoint (0.3 s): not at config import

    def files(tmp: Path) -> dict | None:
        if dist.device.type == "cuda":  # a new thread's current device is cuda:0, whatever the process's
            torch.cuda.set_device(dist.device)
        written = sharded.write(state, tmp, dist.saving, dist.rank)
        every = dist.gather_object(written, group=dist.saving)
        if mine is None:
            return None
        found = {name: entry for part in every for name, entry in part.items()}
        if "weights" in mine:
            found.update(pretrained.write(tmp, mine["config"], mine["weights"]))
        return {**found, STATE: write_torch(tmp / STATE, mine["state"])}

    return _saved(run, step, keep, files)


def _saved(run: RunDir, step: int, keep: int, files: Callable[[Path], dict | None]) -> Path | None:
    """Checkpoint `step` from `files(tmp)` (each written file's manifest entry; None on a process that
    only writes its part): the manifest last, then renamed into place, older ones pruned. If writing
    fails (a full disk), the partial folder is removed at once, so the space is free for the error to
    be recorded."""
    tmp = run.checkpoint_tmp(step)
    try:
        written = files(tmp)
        if written is None:
            return None
        atomic_write_json(tmp / MANIFEST, {"step": step, "files": dict(sorted(written.items()))})
        final = run.checkpoint(step)
        if final.exists():  # a re-run of the same step after a resume: replace it whole
            _delete(run, final)
        commit_dir(tmp, final)
        prune(run, keep)
        return final
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


def complete(run: RunDir | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    run = RunDir(run)
    return [run.checkpoint(step) for step in run.checkpoint_steps()]


def latest(run: RunDir | Path) -> Path | None:
    found = complete(run)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict, dict]:
    """A whole checkpoint's (denoiser's state dict, training state); trainer/runtime/parallel.py puts them
    in place."""
    return pretrained.read(path), load_state(path)


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
    from the newest checkpoint that verifies. Every process takes part: a whole checkpoint is staged and
    written by the main process, a sharded one (`parallel.sharded`) by every process, in the background
    (`writing`)."""

    def __init__(self, cfg: CheckpointConfig, run: RunDir, total_steps: int, seed: int, held: Held):
        self.cfg, self.run, self.seed, self.held, self.total_steps = cfg, run, seed, held, total_steps
        self.should_save = Cadence(cfg.every, total_steps)
        self.stager, self.writer = Stager(), Background()
        self.transformer_json: bytes | None = None  # the transformer's config.json, made at the first save

    def _extra(self, step: int, timing: dict) -> dict:
        return {"data": {"seed": self.seed, "step": step}, "timing": timing, "step": step, "rng": rng_state()}

    def save(self, step: int, timing: dict) -> None:
        """Copy the state to host memory and hand it to the background writer (after the previous write
        is done); training goes on while it is written."""
        held = self.held
        self.writer.wait()  # one write at a time; a failed one raises here
        self.transformer_json = self.transformer_json or pretrained.transformer_config(held.denoiser.prx)
        if held.parallel.sharded:
            return self._save_sharded(step, timing)
        weights = held.parallel.weights()
        optimizer = held.parallel.optimizer_state(held.optimizer)
        ema = held.parallel.ema_state(held.ema)
        if held.dist.main:
            state = {"optimizer": optimizer, "ema": ema, **self._extra(step, timing)}
            weights, state = self.stager.stage((weights, state))
            check_room(self.run, step, nbytes((weights, state)))
            self.writer.submit(
                partial(save, self.run, step, self.transformer_json, weights, state, self.cfg.keep)
            )
        held.dist.wait_for_main()  # the main process staged the state alone

    def _save_sharded(self, step: int, timing: dict) -> None:
        """Each process stages its own shards; the main process empties the folder first, and at the last
        step gathers the whole weights for the diffusers folder (the only gather)."""
        held = self.held
        staged = self.stager.stage(held.parallel.held_state(held.optimizer, held.ema))
        whole = held.parallel.weights() if step == self.total_steps else None  # collective
        check_room(self.run, step, nbytes(staged) * held.dist.world)  # every process's part, one disk
        mine = None
        if held.dist.main:
            mine = {
                "state": {**self._extra(step, timing), "transformer_config": self.transformer_json.decode()}
            }
            if whole is not None:
                mine.update(config=self.transformer_json, weights=whole)
            tmp = self.run.checkpoint_tmp(step)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        held.dist.wait_for_main()  # the folder is empty before any process writes into it
        self.writer.submit(partial(save_sharded, self.run, step, staged, held.dist, mine, self.cfg.keep))

    def check(self) -> None:
        """Raise a background write's error (a full disk) if it has failed; never waits."""
        self.writer.check()

    def wait(self) -> None:
        """Until every save handed to the background is on disk, on every process."""
        self.writer.wait()
        self.held.dist.wait_for_main()  # the main process renames the folder last

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

    def _problem(self, path: Path) -> str | None:
        """`verify(path)`, every process checking its share of the files' contents (a sharded checkpoint
        of a large model is many files); every process gets the answer."""
        dist = self.held.dist
        if dist.world == 1:
            return verify(path)
        return next(filter(None, dist.gather_object(verify(path, (dist.rank, dist.world)))), None)

    def newest_verified(self) -> Path | None:
        """`newest_verified` of the main process's list, the processes sharing the checks."""
        dist = self.held.dist
        candidates = dist.broadcast_object(complete(self.run) if dist.main else None)
        return newest_verified(self.run, problem_of=self._problem, candidates=candidates, main=dist.main)

    def resume(self, note: Callable[[str], None]) -> tuple[int, dict | None]:
        """(step, timing) of the newest checkpoint that verifies, its state put in place; (0, None) when
        there is none. Temporary folders of a killed save are deleted, checkpoints that fail
        verification set aside."""
        held = self.held
        if held.dist.main:
            for tmp in clean_partial(self.run):
                note(f"removed {tmp.name}, left by a killed save or deletion")
        existed = bool(complete(self.run))
        held.dist.wait_for_main()
        path = self.newest_verified()
        if path is None:
            if existed and held.dist.main:
                self.run.update_status(restarted_from_zero=True)
                print(f"warning: {self.run.path}: no checkpoint verifies; training starts again from step 0",
                      file=sys.stderr, flush=True)  # fmt: skip
            return 0, None
        state = self._load(path, optimizer_too=True)
        set_rng_state(state["rng"])
        note(f"resumed from {path.name}")
        return state["step"], state.get("timing", {})

    def _load(self, path: Path, optimizer_too: bool) -> dict:
        """Put checkpoint `path` (either kind, any world size) in place; returns its training state."""
        from trainer.runtime import sharded

        parallel, held = self.held.parallel, self.held
        if sharded.is_sharded(path):
            live = parallel.held_state(held.optimizer, held.ema, optimizer_too=optimizer_too)
            state = sharded.load(path, live, held.dist)
            parallel.put_held_state(held.optimizer, held.ema, live)
            return state
        weights, state = load(path)
        parallel.load_weights(weights)
        if optimizer_too:
            parallel.load_optimizer_state(held.optimizer, state["optimizer"])
        parallel.load_ema_state(held.ema, state["ema"])
        return state

    def load_weights(self, step: int | None) -> int:
        """Put checkpoint `step`'s weights (default: the newest that verifies) and EMA in place, for
        evaluating it again; returns its step."""
        run = self.run
        path = run.checkpoint(step) if step is not None else self.newest_verified()
        if path is None or not path.exists():
            kept = ", ".join(map(str, run.checkpoint_steps())) or "none"
            raise FileNotFoundError(
                f"{run.path}: no {'verified ' if step is None else ''}checkpoint at step "
                f"{step if step is not None else '(any)'}; checkpoints kept: {kept}"
            )
        if step is not None and (problem := self._problem(path)) is not None:
            raise CorruptCheckpoint(f"{path}: fails verification ({problem})")
        return self._load(path, optimizer_too=False)["step"]

    def newest_kept(self) -> str:
        """The newest checkpoint that verifies, by name, for an error message ('none' when there is none)."""
        kept = newest_verified(self.run, set_aside=False)
        return kept.name if kept else "none"
