"""TREAD and SPRINT against their definitions, on the tiny PRX (depth 4, 8×8 tokens)."""

import pytest
import torch
from diffusers.models.transformers.transformer_prx import get_image_ids
from safetensors.torch import load_file
from trainer_testing import crash_at, logged_losses, merge

from trainer import job
from trainer.config import TrainConfig
from trainer.draws import Draws
from trainer.factors.routing import (
    SPRINT,
    TREAD,
    SPRINTConfig,
    TREADConfig,
    gather_pe,
    gather_tokens,
    num_kept,
)
from trainer.model import Denoiser, Factor, FactorContext, ModelConfig, build_prx
from trainer.runtime import checkpoint

CTX = FactorContext(
    hidden_size=64, depth=4, patch_size=2, resolution=16, downsample=1, device=torch.device("cpu")
)


class Spy(Factor):
    """Records the token state at every hook (clones, so later in-place work cannot change them)."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def _record(self, key, state):
        self.seen[key] = dict(
            img=state.img.detach().clone(),
            pe=state.pe.clone(),
            txt=state.txt,
            vec=state.vec,
            mask=state.mask,
            kept=None if state.kept is None else state.kept.clone(),
        )

    def before_block(self, i, state):
        self._record(("before", i), state)

    def after_block(self, i, state):
        self._record(("after", i), state)


def tiny_prx():
    torch.manual_seed(0)
    prx = build_prx(ModelConfig(preset="tiny"), in_channels=3, context_in_dim=32)
    with torch.no_grad():  # diffusers zero-inits the adaLN gates: perturb so blocks change their input
        for p in prx.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return prx


def inputs(b=3):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(b, 3, 16, 16, generator=g), torch.rand(b, generator=g)
    txt, mask = torch.randn(b, 5, 32, generator=g), torch.ones(b, 5, dtype=torch.bool)
    return x, t, txt, mask


def run_blocks(prx, blocks, img, seen):
    """The route's blocks run by hand on `img` with `seen`'s RoPE and conditioning."""
    for i in blocks:
        img = prx.blocks[i](
            hidden_states=img,
            encoder_hidden_states=seen["txt"],
            temb=seen["vec"],
            image_rotary_emb=seen["pe"],
            attention_mask=seen["mask"],
        )
    return img


def routed_forward(route, step=5, train=True, draws=None):
    """`draws`: the step's per-sample draws (default: samples 0..2 of seed 0 at `step`)."""
    prx, before, after = tiny_prx(), Spy(), Spy()
    den = Denoiser(prx, [before, route, after]).train(train)
    draws = draws or Draws(0, step, range(3))
    with torch.no_grad():
        out = den(*inputs(), inputs={"step": step, "draws": draws}).pred
    return prx, before.seen, after.seen, out


def test_tread_routes_kept_tokens_through_blocks_and_returns_the_others_bit_identical():
    route = TREAD(TREADConfig(start=1, end=3), CTX)  # blocks 1 and 2 routed
    prx, before, after, _ = routed_forward(route)
    dense = before["before", 1]  # what entered the route: (B, 64, C)
    inside = after["before", 1]  # what block 1 sees
    kept = inside["kept"]  # (B, 32)
    b, n = dense["img"].shape[:2]
    assert kept.shape == (b, num_kept(n, 0.5)) == (3, 32)
    assert all(torch.equal(k, k.unique()) for k in kept)  # distinct and sorted
    assert not torch.equal(kept[0], kept[1])  # per-sample subsets
    assert inside["img"].shape == (3, 32, 64) and torch.equal(
        inside["img"], gather_tokens(dense["img"], kept)
    )

    # RoPE follows the tokens: equal to the embedding of the kept tokens' own (row, col) ids
    ids = get_image_ids(b, 16, 16, patch_size=2, device="cpu")  # (B, 64, 2)
    assert torch.equal(inside["pe"], prx.pe_embedder(ids.gather(1, kept[:, :, None].expand(-1, -1, 2))))
    assert torch.equal(inside["pe"], gather_pe(dense["pe"], kept))

    out = after["after", 2]["img"]  # (B, 64, C) after the route
    assert out.shape == dense["img"].shape and after["after", 2]["kept"] is None
    assert torch.equal(after["after", 2]["pe"], dense["pe"])
    routed = torch.ones(b, n, dtype=torch.bool).scatter(1, kept, False)
    assert torch.equal(out[routed], dense["img"][routed])  # routed-around tokens: bit-identical
    manual = run_blocks(prx, [1, 2], gather_tokens(dense["img"], kept), inside)
    assert torch.equal(gather_tokens(out, kept), manual)  # kept tokens: the blocks on the gathered subset
    assert not torch.allclose(manual, gather_tokens(dense["img"], kept))  # and they were processed


def test_tread_subset_is_keyed_by_seed_step_and_global_sample_index_only():
    def kept(step=5, seed=0, indices=range(3)):
        route = TREAD(TREADConfig(start=1, end=3), CTX)
        return routed_forward(route, step, draws=Draws(seed, step, indices))[2]["before", 1]["kept"]

    assert torch.equal(kept(), kept())
    assert not torch.equal(kept(5), kept(6)) and not torch.equal(kept(5), kept(5, seed=1))
    # sample 4's subset is its own wherever it sits: row 1 of one process, or row 2 of another batch
    assert torch.equal(kept(indices=[3, 4, 5])[1], kept(indices=[9, 0, 4])[2])
    assert not torch.equal(kept(indices=[3, 4, 5])[1], kept(indices=[3, 5, 4])[1])


def test_tread_is_off_at_eval():
    route = TREAD(TREADConfig(start=1, end=3), CTX)
    _, _, after, out = routed_forward(route, train=False)
    assert after["before", 1]["kept"] is None and after["before", 1]["img"].shape[1] == 64
    with torch.no_grad():
        plain = Denoiser(tiny_prx()).eval()(*inputs()).pred
    assert torch.equal(out, plain)


def test_sprint_eval_drops_nothing_and_still_fuses():
    route = SPRINT(SPRINTConfig(start=1, end=3), CTX)
    assert route.mask_token.shape == (1, 1, 64) and not route.mask_token.any()  # zero-initialised
    prx, before, after, _ = routed_forward(route, train=False)
    dense = before["before", 1]
    assert after["before", 1]["kept"] is None and torch.equal(
        after["before", 1]["img"], dense["img"]
    )  # all 64
    deep = run_blocks(prx, [1, 2], dense["img"], dense)
    with torch.no_grad():
        fused = route.fuse(torch.cat([dense["img"], deep], dim=-1))
    assert torch.equal(after["after", 2]["img"], fused)
    assert not torch.allclose(fused, deep)  # the fusion is applied, not skipped


def test_sprint_training_keeps_a_quarter_and_fills_dropped_slots_with_the_mask_token():
    route = SPRINT(SPRINTConfig(start=1, end=3), CTX)
    with torch.no_grad():
        route.mask_token.normal_()  # a trained mask token, so dropped slots are recognisable
    prx, before, after, _ = routed_forward(route)
    dense, kept = before["before", 1], after["before", 1]["kept"]
    assert kept.shape == (3, 16)  # 25 % of 64
    deep = route.mask_token.expand(3, 64, 64).clone()
    deep.scatter_(
        1,
        kept[:, :, None].expand(-1, -1, 64),
        run_blocks(prx, [1, 2], gather_tokens(dense["img"], kept), after["before", 1]),
    )
    with torch.no_grad():
        expected = route.fuse(torch.cat([dense["img"], deep], dim=-1))
    assert torch.equal(after["after", 2]["img"], expected)


@pytest.mark.parametrize(
    "routing", [{"kind": "tread", "start": 1, "end": 3}, {"kind": "sprint", "start": 1, "end": 3}]
)
def test_routed_run_trains_checkpoints_and_resumes_exactly(make_run, monkeypatch, routing):
    cfg = dict(routing=routing, train={"steps": 8}, checkpoint={"every": 4, "keep": 3})
    straight, resumed = make_run("straight", **cfg), make_run("resumed", **cfg)
    job.run(straight)
    with crash_at(6), pytest.raises(KeyboardInterrupt):
        job.run(resumed)
    job.run(resumed)  # resumes from step 4, factor parameters included

    a, b = (load_file(checkpoint.latest(d) / "factors.safetensors") for d in (straight, resumed))
    expected = {"0.mask_token", "0.fuse.weight", "0.fuse.bias"} if routing["kind"] == "sprint" else set()
    assert set(a) == set(b) == expected and all(torch.equal(a[k], b[k]) for k in a)
    if expected:
        first = load_file(checkpoint.complete(straight)[0] / "factors.safetensors")
        assert not torch.equal(first["0.fuse.weight"], a["0.fuse.weight"])  # trained between checkpoints
    assert logged_losses(straight) == logged_losses(resumed)


def test_route_validation_names_the_fix(tiny_cfg):
    with pytest.raises(ValueError, match=r"routing.start 3 must be below routing.end 3"):
        TREADConfig(start=3, end=3)
    with pytest.raises(
        ValueError, match=r"routing blocks \[2, 13\) exceed the model's 4 blocks; set routing.end ≤ 4"
    ):
        TrainConfig.model_validate(merge(tiny_cfg, {"routing": {"kind": "tread"}}))
    cfg = TrainConfig.model_validate(
        merge(tiny_cfg, {"model": {"preset": "prx-1.2b"}, "routing": {"kind": "sprint"}})
    )
    assert (
        list(cfg.routing.blocks) == list(range(2, 13)) and cfg.routing.keep == 0.25
    )  # the study's blocks 2..12
    with pytest.raises(ValueError, match="keep"):
        SPRINTConfig(keep=1.0)
