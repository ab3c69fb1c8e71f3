"""One process of the meta-device init test (test_fsdp.py): the PRX built on meta, sharded, then
materialised, against a whole build of the same seed; and the memory a meta build takes."""

from __future__ import annotations

import ctypes
import gc
import re

import torch
import torch.distributed as tdist

# Every kind of layer the sharded denoiser holds: PRX (Linear, RMSNorm, zeroed Modulation and final
# layer), and factor modules built whole after it: SPRINT's fusion and mask token, REPA's projector,
# the resolution embedder.
TINY = dict(preset="tiny")
# 47 M parameters (189 MB fp32): large enough that half of it stands out from a process's noise
LARGE = dict(
    preset=None, hidden_size=512, depth=8, num_heads=8, mlp_ratio=3.5, patch_size=2, axes_dim=(32, 32)
)


def _factors():
    from trainer.factors.repa import REPAConfig, build_repa
    from trainer.factors.resolution import VecResolutionConfig, build_vec
    from trainer.factors.routing import SPRINTConfig, build_sprint
    from trainer.model import FactorContext

    ctx = FactorContext(
        hidden_size=64, depth=4, patch_size=2, resolution=16, downsample=1, device=torch.device("cpu")
    )
    return [
        build_sprint(SPRINTConfig(start=1, end=2), ctx),
        build_repa(REPAConfig(teacher={"kind": "tiny"}, block=1), ctx),
        build_vec(VecResolutionConfig(), ctx),
    ]


def _denoiser(meta: bool, dtype: torch.dtype, mesh):
    """A sharded denoiser of seed 0: whole build (today's path) or meta build; and the generator's state after."""
    from trainer.factors.precision import Precision
    from trainer.model import DeferredPRX, Denoiser, ModelConfig, build_prx
    from trainer.runtime.parallel import FSDPConfig, shard

    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    deferred = DeferredPRX.build(cfg, 3, 32) if meta else None
    prx = deferred.prx if meta else build_prx(cfg, 3, 32)
    den = Denoiser(prx, _factors()).place(torch.device("cpu"), dtype)
    rng = torch.get_rng_state()
    was_meta = all(p.is_meta for p in den.prx.parameters())
    shard(den, mesh, FSDPConfig(), Precision(dtype, False, "cpu"))
    if meta:
        deferred.materialise(torch.device("cpu"))
    return den, rng, was_meta


def _losses(den, steps: int = 2) -> list[float]:
    """The first training steps on fixed inputs: AdamW, a step's loss each."""
    from trainer.draws import Draws

    opt = torch.optim.AdamW(den.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        images = torch.rand(2, 3, 16, 16, generator=g)
        pred = den(images * 2 - 1, torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g), None,
                   inputs={"images": images, "step": step, "draws": Draws.of_rank(0, step, 0, 2, "cpu")})  # fmt: skip
        loss = pred.pred.square().mean() + sum(pred.losses.values())
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def _growth(build) -> tuple[int, object]:
    """Peak resident memory `build()` adds to the process: the high-water mark reset first."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory freed before goes back: it cannot hide a peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    kept = build()
    return _status("VmHWM") - base, kept


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from trainer.factors.precision import Precision
    from trainer.model import DeferredPRX, Denoiser, ModelConfig, build_prx
    from trainer.runtime.parallel import FSDPConfig, shard

    # glibc serves blocks under 32 MB from its heap, which keeps what they free; every layer of a 1.2B or
    # 5B PRX is over that and gets pages of its own, returned when freed. Here the layers are a few MB:
    # the same rule for them, so the peak measured is what the process holds, not the heap's leftovers
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    result: dict = {"equal": {}, "rng": {}, "was_meta": {}}
    for dtype in (torch.float32, torch.bfloat16):
        whole, rng_whole, _ = _denoiser(False, dtype, mesh)
        meta, rng_meta, was_meta = _denoiser(True, dtype, mesh)
        mine, full = {}, {}
        for (name, a), (_, b) in zip(whole.named_parameters(), meta.named_parameters(), strict=True):
            mine[name] = torch.equal(a.to_local(), b.to_local()) and a.dtype == b.dtype == dtype
            full[name] = torch.equal(a.full_tensor(), b.full_tensor())  # collective: every rank, same order
        result["equal"][str(dtype)] = (mine, full)
        result["rng"][str(dtype)] = torch.equal(rng_whole, rng_meta)
        result["was_meta"][str(dtype)] = was_meta
        if dtype == torch.float32:
            result["losses"] = (_losses(whole), _losses(meta))
            result["shard_of_whole"] = all(  # each shard is the whole build's tensor cut as FSDP cuts it
                torch.equal(p.to_local(), distribute_tensor(p.full_tensor().detach(), mesh, p.placements, src_data_rank=None).to_local())
                for p in meta.parameters()
            )  # fmt: skip
        del whole, meta

    cfg = ModelConfig(**LARGE)
    result["full_bytes"] = 4 * sum(p.numel() for p in DeferredPRX.build(cfg, 3, 32).prx.parameters())

    def sharded():
        deferred = DeferredPRX.build(cfg, 3, 32)
        shard(Denoiser(deferred.prx), mesh, FSDPConfig(), Precision(torch.float32, False, "cpu"))
        deferred.materialise(torch.device("cpu"))
        return deferred

    result["meta_growth"], deferred = _growth(sharded)
    result["largest"] = deferred.largest
    del deferred
    result["whole_growth"], _ = _growth(lambda: build_prx(cfg, 3, 32))  # the control: what the test measures
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    tdist.destroy_process_group()
