"""An arm's weights as a diffusers folder: what `PRXTransformer2DModel.from_pretrained` loads.

    transformer/config.json                          the model's config, as save_pretrained writes it
    transformer/diffusion_pytorch_model.safetensors  PRX's weights, one file whatever the size
                                                     (diffusers splits past 10 GB; it reads either)
    factors.safetensors                              parameters recipe factors add (REPA projector, …)

A whole checkpoint holds this folder; a sharded one holds it at the last step; `ablate export`
writes it from any checkpoint. The files are hashed as they are written (trainer/runtime/checksum.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.runtime.checksum import write_bytes, write_safetensors

CONFIG = "transformer/config.json"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"  # the file diffusers' from_pretrained reads
FACTORS = "factors.safetensors"
RECORD = "export.json"  # written last into an export (what it was made from): marks a folder as one


def _part(weights: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def transformer_config(prx: torch.nn.Module) -> bytes:
    """The config.json diffusers' save_pretrained writes for `prx` (a sharded model cannot save itself):
    from a plain PRX built on the meta device, so nothing is allocated."""
    from diffusers import PRXTransformer2DModel

    with torch.device("meta"):
        plain = PRXTransformer2DModel.from_config(prx.config)
    return plain.to_json_string().encode()


def write(folder: Path, config: bytes, weights: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The denoiser's whole weights (prx.…, factors.…) as the folder above, in `folder`; returns each
    file's manifest entry."""
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    return {
        CONFIG: write_bytes(folder / CONFIG, config),
        WEIGHTS: write_safetensors(folder / WEIGHTS, _part(weights, "prx."), {"format": "pt"}),
        FACTORS: write_safetensors(folder / FACTORS, _part(weights, "factors.")),
    }


def read(folder: Path) -> dict[str, torch.Tensor]:
    """The denoiser's whole weights (prx.…, factors.…) from the folder above."""
    prx, factors = load_file(folder / WEIGHTS), load_file(folder / FACTORS)
    return {**{f"prx.{k}": v for k, v in prx.items()}, **{f"factors.{k}": v for k, v in factors.items()}}


def export(checkpoint: Path, out: Path, *, raw: bool = False) -> str:
    """Checkpoint `checkpoint` (whole or sharded) as the folder above at `out`, replaced whole (written
    beside it, then renamed). The weights are those evaluation uses, the EMA's shadows where the arm
    keeps an EMA, in the weights' own dtypes; `raw` takes the trained weights instead. Returns which
    weights were written: "ema" or "raw". One process, no process group, no GPU."""
    import shutil

    from core.atomic import atomic_write_json, commit_dir
    from trainer.runtime import sharded
    from trainer.runtime.checkpoint import load_state

    state = load_state(checkpoint)
    if sharded.is_sharded(checkpoint):
        weights, config = sharded.read_whole(checkpoint, "model."), state["transformer_config"].encode()
        shadow = {} if raw else sharded.read_whole(checkpoint, "ema.shadow.")
    else:
        weights, config = read(checkpoint), (checkpoint / CONFIG).read_bytes()
        shadow = {} if raw else state["ema"].get("shadow", {})
    weights.update({k: v.to(weights[k].dtype) for k, v in shadow.items()})  # as the EMA's swap copies them
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    kind = "ema" if shadow else "raw"
    try:
        write(tmp, config, weights)
        record = {"checkpoint": str(checkpoint), "step": state["step"], "weights": kind}
        atomic_write_json(tmp / RECORD, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (a full disk) leaves nothing behind
        raise
    if out.exists():
        shutil.rmtree(out)
    commit_dir(tmp, out)
    return kind
