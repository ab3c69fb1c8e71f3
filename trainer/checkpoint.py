"""Checkpoints: written whole to a temporary folder, flushed, then renamed, so a folder named step_N is complete.

checkpoints/step_00000100/        (the name and place: core.rundir.RunDir.checkpoint)
    transformer/          diffusers save_pretrained: loadable by PRXTransformer2DModel.from_pretrained
    factors.safetensors   parameters recipe factors add (REPA projector, SPRINT fusion, …)
    state.pt              step, optimizer(s), EMA, RNG states (torch, numpy, python, CUDA), data position
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core.atomic import commit_dir
from core.rundir import RunDir


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


def save(run: RunDir, step: int, denoiser: torch.nn.Module, state: dict, keep: int) -> Path:
    """Write checkpoint `step` of `run` atomically and keep the newest `keep`."""
    final, tmp = run.checkpoint(step), run.checkpoint_tmp(step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    denoiser.prx.save_pretrained(tmp / "transformer", safe_serialization=True)
    factors = {k: v.detach().contiguous() for k, v in denoiser.factors.state_dict().items()}
    save_file(factors, tmp / "factors.safetensors")
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        shutil.rmtree(final)
    commit_dir(tmp, final)
    for old in complete(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(run: RunDir | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    run = RunDir(run)
    return [run.checkpoint(step) for step in run.checkpoint_steps()]


def latest(run: RunDir | Path) -> Path | None:
    found = complete(run)
    return found[-1] if found else None


def load(path: Path, denoiser: torch.nn.Module) -> dict:
    """Load weights into `denoiser` in place (dtype kept) and return the training state."""
    weights = load_file(path / "transformer" / "diffusion_pytorch_model.safetensors")
    denoiser.prx.load_state_dict(weights, strict=True)
    denoiser.factors.load_state_dict(load_file(path / "factors.safetensors"), strict=True)
    return torch.load(path / "state.pt", weights_only=False)
