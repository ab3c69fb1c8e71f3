"""Checkpoints: written to a temporary folder, then renamed, so a folder named step_N is complete.

    checkpoints/step_00000100/
        transformer/   diffusers save_pretrained: loadable by PRXTransformer2DModel.from_pretrained
        factors.safetensors   parameters recipe factors add (REPA projector, SPRINT fusion, …)
        state.pt       step, optimizer(s), EMA, RNG states (torch, numpy, python, CUDA), data position
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step_"


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


def save(root: Path, step: int, denoiser: torch.nn.Module, state: dict, keep: int) -> Path:
    """Write checkpoint `step` under `root` atomically and keep the newest `keep`."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{PREFIX}{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    denoiser.prx.save_pretrained(tmp / "transformer", safe_serialization=True)
    factors = {k: v.detach().contiguous() for k, v in denoiser.factors.state_dict().items()}
    save_file(factors, tmp / "factors.safetensors")
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


def load(path: Path, denoiser: torch.nn.Module) -> dict:
    """Load weights into `denoiser` in place (dtype kept) and return the training state."""
    weights = load_file(path / "transformer" / "diffusion_pytorch_model.safetensors")
    denoiser.prx.load_state_dict(weights, strict=True)
    denoiser.factors.load_state_dict(load_file(path / "factors.safetensors"), strict=True)
    return torch.load(path / "state.pt", weights_only=False)
