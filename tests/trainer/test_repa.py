"""REPA and iREPA against their formulas, with the tiny random-init teacher (no weights needed)."""

import math
import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from trainer_testing import crash_at, logged_losses, merge
from transformers import Dinov2Config, Dinov2Model, DINOv3ViTConfig, DINOv3ViTModel

from core import weights
from trainer import job
from trainer.config import TrainConfig
from trainer.factors.repa import (
    IREPAConfig,
    IREPAFactor,
    REPAConfig,
    REPAFactor,
    Teacher,
    build_hf_teacher,
    build_irepa,
    build_repa,
    spatial_norm,
)
from trainer.factors.routing import TREAD, TREADConfig, gather_tokens
from trainer.model import Denoiser, Factor, FactorContext, ModelConfig, TokenState, build_prx
from trainer.runtime import checkpoint

CTX = FactorContext(
    hidden_size=64, depth=4, patch_size=2, resolution=16, downsample=1, device=torch.device("cpu")
)
TINY_TEACHER = {"kind": "tiny"}


class Spy(Factor):
    def __init__(self, block):
        super().__init__()
        self.block, self.h, self.kept = block, None, None

    def after_block(self, i, state):
        if i == self.block:
            self.h, self.kept = state.img.detach().clone(), state.kept


def forward(factors, step=0, b=3):
    torch.manual_seed(0)
    prx = build_prx(ModelConfig(preset="tiny"), in_channels=3, context_in_dim=32)
    den = Denoiser(prx, factors).train()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(b, 3, 16, 16, generator=g)
    out = den(
        images * 2 - 1,
        torch.rand(b, generator=g),
        torch.randn(b, 5, 32, generator=g),
        torch.ones(b, 5, dtype=torch.bool),
        inputs={"images": images, "step": step},
    )
    return out, images


def test_repa_loss_is_minus_weight_times_mean_cosine_on_a_known_input():
    # identity projector, stub teacher: half the tokens aligned (cos 1), a quarter opposed (-1),
    # a quarter orthogonal (0)
    y = torch.randn(2, 8, 4)
    h = torch.cat(
        [3 * y[:, :4], -y[:, 4:6], torch.stack([-y[:, 6:, 1], y[:, 6:, 0], -y[:, 6:, 3], y[:, 6:, 2]], -1)],
        dim=1,
    )
    factor = REPAFactor(
        REPAConfig(teacher=TINY_TEACHER, block=0, weight=0.5),
        teacher=lambda im, grid: y,
        projector=torch.nn.Identity(),
    ).train()
    state = TokenState(
        img=h, txt=None, vec=None, pe=None, mask=None, grid=(2, 4), inputs={"images": None, "step": 0}
    )
    factor.after_block(0, state)
    assert state.losses["repa"].item() == pytest.approx(
        -0.5 * (4 - 2 + 0) / 8, abs=1e-6
    )  # −w·mean cos = −0.125


def test_repa_reads_the_hidden_state_after_its_block_and_aligns_with_the_teacher_patch_tokens():
    repa, spy = build_repa(REPAConfig(teacher=TINY_TEACHER, block=1, weight=0.7), CTX), Spy(1)
    out, images = forward([repa, spy])
    teacher = repa.teacher
    y = teacher(images, (8, 8))  # (B, 64, 32)
    expected = -0.7 * F.cosine_similarity(repa.projector(spy.h), y, dim=-1).mean()
    assert y.shape == (3, 64, 32)
    assert out.losses["repa"].item() == pytest.approx(expected.item(), rel=1e-6)
    out.losses["repa"].backward()  # the loss trains the projector and the blocks up to `block`
    assert repa.projector[0].weight.grad.abs().sum() > 0


def test_teacher_input_matches_the_token_grid_normalised_and_prefix_stripped():
    """224 px for a patch-14 DINOv2 and 256 px for a patch-16 DINOv3 at a 16×16 token grid."""
    images = torch.rand(1, 3, 256, 256)
    for model, patch, prefix, size in [
        (
            Dinov2Model(
                Dinov2Config(
                    hidden_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=32,
                    patch_size=14,
                    image_size=224,
                )
            ),
            14,
            1,
            224,
        ),
        (
            DINOv3ViTModel(
                DINOv3ViTConfig(
                    hidden_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=32,
                    patch_size=16,
                    num_register_tokens=4,
                )
            ),
            16,
            5,
            256,
        ),
    ]:
        seen = {}
        model.register_forward_pre_hook(
            lambda m, a, kw, seen=seen: seen.update(x=kw["pixel_values"]), with_kwargs=True
        )
        tokens = Teacher(model, patch, prefix)(images, (16, 16))
        assert seen["x"].shape == (1, 3, size, size)
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        resized = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True)
        assert torch.allclose(seen["x"], (resized - mean[:, None, None]) / std[:, None, None], atol=1e-6)
        with torch.no_grad():
            full = model(pixel_values=seen["x"]).last_hidden_state
        assert full.shape[1] == prefix + 256 and torch.equal(tokens, full[:, prefix:])


def test_teacher_is_frozen_and_out_of_the_checkpoint():
    repa = build_repa(REPAConfig(teacher=TINY_TEACHER, block=1, projector_dim=48), CTX)
    den = Denoiser(build_prx(ModelConfig(preset="tiny"), 3, 32), [repa]).train()
    assert not repa.teacher.training and not any(p.requires_grad for p in repa.teacher.parameters())
    names = {n for n, _ in den.named_parameters()}
    assert not any("teacher" in n for n in names) and {"factors.0.projector.0.weight"} <= names
    assert set(den.factors.state_dict()) == {
        f"0.projector.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")
    }
    shapes = [tuple(repa.projector[i].weight.shape) for i in (0, 2, 4)]
    assert shapes == [(48, 64), (48, 48), (32, 48)]  # C → D → D → teacher width


def test_missing_teacher_weights_is_one_line_naming_the_model_and_the_command(tmp_path):
    cfg = REPAConfig(teacher={"kind": "dinov3-vitl16"})
    with pytest.raises(weights.MissingWeightsError) as err:
        build_hf_teacher(cfg.teacher, FactorContext(**{**CTX.__dict__, "weights_dir": str(tmp_path)}))
    msg = str(err.value)
    assert "\n" not in msg and "facebook/dinov3-vitl16-pretrain-lvd1689m" in msg
    assert f"ablate weights download SWEEP --dir {tmp_path}" in msg
    assert weights.required(cfg) == [weights.HFWeights("facebook/dinov3-vitl16-pretrain-lvd1689m")]


def test_irepa_spatial_norm_formula():
    y = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]]])  # (B=1, L=3, D=2)
    # per channel over tokens: means (3, 5), unbiased stds (2, √13)
    expected = torch.tensor(
        [
            [
                [(1 - 1.5) / (2 + 1e-6), (2 - 2.5) / (math.sqrt(13) + 1e-6)],
                [(3 - 1.5) / (2 + 1e-6), (4 - 2.5) / (math.sqrt(13) + 1e-6)],
                [(5 - 1.5) / (2 + 1e-6), (9 - 2.5) / (math.sqrt(13) + 1e-6)],
            ]
        ]
    )
    assert torch.allclose(spatial_norm(y, 0.5), expected, atol=1e-6)
    cfg = IREPAConfig(teacher=TINY_TEACHER)  # the paper's variant by default
    assert (cfg.alpha, cfg.target_norm, cfg.projector, cfg.needs_full_grid) == (0.6, "alpha", "conv", True)


def test_irepa_conv_projector_runs_on_the_row_major_token_grid():
    irepa = build_irepa(IREPAConfig(teacher=TINY_TEACHER, block=1), CTX)
    conv = irepa.projector.conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (64, 32, (3, 3), (1, 1))
    h = torch.randn(2, 6, 64)  # a 2×3 grid, token index = row·3 + col
    out = irepa.projector(h, None, (2, 3))
    ref = conv(h.view(2, 2, 3, 64).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(2, 6, 32)
    assert out.shape == (2, 6, 32) and torch.allclose(out, ref, atol=1e-6)

    spy = Spy(1)
    out, images = forward([irepa, spy])
    y = spatial_norm(irepa.teacher(images, (8, 8)), 0.6)
    expected = -0.5 * F.cosine_similarity(irepa.projector(spy.h, None, (8, 8)), y, dim=-1).mean()
    assert isinstance(irepa, IREPAFactor) and out.losses["repa"].item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_irepa_prx_target_norm_subtracts_the_per_token_channel_mean_times_the_token_mean():
    y = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]]])  # (B=1, L=3, D=2)
    # PRX: γ = per-token channel means (1.5, 3.5, 7); token means per channel (3, 5); y − γ·mean:
    shifted = torch.tensor([[[1 - 4.5, 2 - 7.5], [3 - 10.5, 4 - 17.5], [5 - 21.0, 9 - 35.0]]])
    # then divided by the unbiased std over tokens of the shifted values (not of y): √40.75, √106.75
    expected = shifted / (torch.tensor([math.sqrt(40.75), math.sqrt(106.75)]) + 1e-6)
    cfg = IREPAConfig(teacher=TINY_TEACHER, target_norm="per-token-mean")
    factor = IREPAFactor(cfg, teacher=None, projector=torch.nn.Identity())
    assert torch.allclose(factor.target(y), expected, atol=1e-6)
    assert torch.allclose(spatial_norm(y, y.mean(dim=2, keepdim=True)), expected, atol=1e-6)
    with pytest.raises(ValueError, match="repa.alpha is unused with repa.target_norm 'per-token-mean'"):
        IREPAConfig(teacher=TINY_TEACHER, target_norm="per-token-mean", alpha=0.8)
    assert IREPAConfig.model_validate(cfg.model_dump()) == cfg  # a resolved config validates again


def rope_attention(proj, h, rows, cols):
    """PRX's attention projector written out: 4 heads, pairs of head dims rotated by pos·θ^(−j/(Dh/4)),
    rows on the first half of the pairs and columns on the second, softmax(qkᵀ/√Dh)·v, out_proj, output."""
    b, k, c = h.shape
    dh = c // 4
    freqs = 10000.0 ** (-torch.arange(dh // 4) / (dh // 4))  # (Dh/4,)
    angle = torch.cat([rows[..., None] * freqs, cols[..., None] * freqs], dim=-1)  # (B, K, Dh/2)
    rot = torch.polar(torch.ones_like(angle), angle)[:, None]  # (B, 1, K, Dh/2)

    def heads(x):  # (B, K, C) → (B, 4, K, Dh)
        return x.view(b, k, 4, dh).transpose(1, 2)

    def rope(x):  # each (even, odd) pair as a complex number, turned by its angle
        return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * rot).flatten(-2)

    q, key, v = rope(heads(proj.q_proj(h))), rope(heads(proj.k_proj(h))), heads(proj.v_proj(h))
    attn = torch.softmax(q @ key.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v  # (B, 4, K, Dh)
    return proj.output(proj.out_proj(attn.transpose(1, 2).reshape(b, k, c)))


def test_irepa_attention_projector_is_rope_attention_over_the_tokens_it_is_given():
    cfg = IREPAConfig(teacher=TINY_TEACHER, block=1, projector="attention")
    assert not cfg.needs_full_grid and cfg.hidden_multiple == 16
    proj = build_irepa(cfg, CTX).projector
    shapes = {n: tuple(p.shape) for n, p in proj.named_parameters() if n.endswith("weight")}
    assert shapes == {
        **{f"{n}.weight": (64, 64) for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "output.weight": (32, 64),
    }  # PRX's module names: C → C four times, then C → teacher width
    h = torch.randn(2, 6, 64)  # a 2×3 grid, token index = row·3 + col
    rows, cols = (
        torch.tensor([0, 0, 0, 1, 1, 1.0]).expand(2, 6),
        torch.tensor([0, 1, 2, 0, 1, 2.0]).expand(2, 6),
    )
    out = proj(h, None, (2, 3))
    assert out.shape == (2, 6, 32) and torch.allclose(out, rope_attention(proj, h, rows, cols), atol=1e-5)

    kept = torch.tensor([[0, 2, 5], [1, 3, 4]])  # a route's kept tokens: they attend among themselves
    part = gather_tokens(h, kept)  # (2, 3, 64)
    out = proj(part, kept, (2, 3))
    assert out.shape == (2, 3, 32)
    assert torch.allclose(out, rope_attention(proj, part, kept // 3, kept % 3), atol=1e-5)
    assert not torch.allclose(out, proj(part, None, (2, 3)), atol=1e-3)  # at their own grid positions


def test_irepa_attention_inside_a_tread_route_aligns_the_kept_tokens():
    route = TREAD(TREADConfig(start=1, end=3), CTX)
    cfg = IREPAConfig(teacher=TINY_TEACHER, block=1, projector="attention", target_norm="per-token-mean")
    irepa, spy = build_irepa(cfg, CTX), Spy(1)
    out, images = forward([route, irepa, spy])
    assert spy.h.shape == (3, 32, 64) and spy.kept.shape == (3, 32)
    y = irepa.teacher(images, (8, 8))  # normalised on the full grid, then gathered to the kept tokens
    y = gather_tokens(spatial_norm(y, y.mean(dim=2, keepdim=True)), spy.kept)
    pred = rope_attention(irepa.projector, spy.h, spy.kept // 8, spy.kept % 8)
    expected = -0.5 * F.cosine_similarity(pred, y, dim=-1).mean()
    assert out.losses["repa"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        REPAConfig(teacher=TINY_TEACHER, block=1, projector_dtype="bf16"),
        IREPAConfig(teacher=TINY_TEACHER, block=1, projector="conv", projector_dtype="bf16"),
        IREPAConfig(teacher=TINY_TEACHER, block=1, projector="attention", projector_dtype="bf16"),
    ],
    ids=["repa", "irepa-conv", "irepa-attention"],
)
def test_a_bf16_projector_is_stored_and_trained_in_bf16_beside_fp32_weights(cfg):
    """PRX's storage: the projector cast to bf16 once built, its gradients and AdamW moments bf16 too."""
    build = build_repa if cfg.kind == "repa" else build_irepa
    torch.manual_seed(0)
    fp32 = build(cfg.model_copy(update={"projector_dtype": "fp32"}), CTX)
    torch.manual_seed(0)
    factor, spy = build(cfg, CTX), Spy(1)
    # the same initial draws, rounded to bf16
    init = dict(fp32.projector.named_parameters())
    assert all(
        torch.equal(p, init[n.removeprefix("module.")].bfloat16())
        for n, p in factor.projector.named_parameters()
    )

    # the trainer casts the denoiser to the weights' dtype: the projector stays bf16
    den = Denoiser(build_prx(ModelConfig(preset="tiny"), 3, 32), [factor]).to("cpu", torch.float32).float()
    assert {p.dtype for n, p in den.named_parameters() if ".projector." in n} == {torch.bfloat16}
    assert {p.dtype for n, p in den.named_parameters() if ".projector." not in n} == {torch.float32}

    out, images = forward([factor, spy])  # fp32 hidden states, no autocast (CPU)
    y = factor.target(factor.teacher(images, (8, 8)))
    pred = factor.project(spy.h, TokenState(*[None] * 5, grid=(8, 8)))  # fp32 in, cast: bf16 out
    assert pred.dtype == torch.bfloat16
    expected = -0.5 * F.cosine_similarity(pred.float(), y, dim=-1, eps=1e-8).mean()
    assert out.losses["repa"].item() == pytest.approx(expected.item(), rel=1e-6)

    out.losses["repa"].backward()
    opt = torch.optim.AdamW(factor.projector.parameters(), lr=1e-2, eps=1e-15)
    before = {n: p.detach().clone() for n, p in factor.projector.named_parameters()}
    opt.step()
    for n, p in factor.projector.named_parameters():
        assert p.grad.dtype == p.dtype == opt.state[p]["exp_avg"].dtype == torch.bfloat16, n
    assert any(not torch.equal(p, before[n]) for n, p in factor.projector.named_parameters())


def test_after_stop_step_no_teacher_no_projector_no_loss():
    repa = build_repa(REPAConfig(teacher=TINY_TEACHER, block=1, stop_step=3), CTX)
    calls = {"teacher": 0, "projector": 0}
    repa.teacher.model.register_forward_pre_hook(
        lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1)
    )
    repa.projector.register_forward_pre_hook(
        lambda *a: calls.__setitem__("projector", calls["projector"] + 1)
    )
    assert "repa" in forward([repa], step=2)[0].losses and calls == {"teacher": 1, "projector": 1}
    assert "repa" not in forward([repa], step=3)[0].losses and calls == {"teacher": 1, "projector": 1}
    assert repa.skips_params  # DDP is told to expect the projector's missing gradients


def test_repa_inside_a_tread_route_aligns_only_the_kept_tokens():
    route = TREAD(TREADConfig(start=1, end=3), CTX)
    repa, spy = build_repa(REPAConfig(teacher=TINY_TEACHER, block=1), CTX), Spy(1)
    out, images = forward([route, repa, spy])
    assert spy.h.shape == (3, 32, 64) and spy.kept.shape == (3, 32)
    y = gather_tokens(repa.teacher(images, (8, 8)), spy.kept)  # (B, 32, Dt): the teacher at the kept tokens
    expected = -0.5 * F.cosine_similarity(repa.projector(spy.h), y, dim=-1).mean()
    assert out.losses["repa"].item() == pytest.approx(expected.item(), rel=1e-6)

    # at the route's last block the hidden state is the rejoined full sequence again
    route, repa, spy = (
        TREAD(TREADConfig(start=0, end=2), CTX),
        build_repa(REPAConfig(teacher=TINY_TEACHER, block=1), CTX),
        Spy(1),
    )
    out, images = forward([route, repa, spy])
    assert spy.h.shape == (3, 64, 64) and spy.kept is None
    expected = -0.5 * F.cosine_similarity(repa.projector(spy.h), repa.teacher(images, (8, 8)), dim=-1).mean()
    assert out.losses["repa"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_repa_validation_names_the_fix(tiny_cfg):
    def check(over):
        return TrainConfig.model_validate(merge(tiny_cfg, over))

    repa = {"kind": "repa", "teacher": TINY_TEACHER, "block": 1}
    with pytest.raises(
        ValueError, match=r"repa.block 7 is outside the model's blocks 0..3; set repa.block < 4"
    ):
        check({"repa": {"kind": "repa", "teacher": TINY_TEACHER}})
    with pytest.raises(ValueError, match=r"set repa.routed_target: gather"):
        check({"repa": repa, "routing": {"kind": "sprint", "start": 1, "end": 4}})
    check({"repa": {**repa, "routed_target": "gather"}, "routing": {"kind": "sprint", "start": 1, "end": 4}})
    check(
        {"repa": repa, "routing": {"kind": "sprint", "start": 0, "end": 2}}
    )  # block end-1: after the rejoin
    check({"repa": repa, "routing": {"kind": "tread", "start": 1, "end": 4}})  # TREAD implies gather
    with pytest.raises(ValueError, match="conv projector needs the full token grid"):
        check({"repa": {**repa, "kind": "irepa"}, "routing": {"kind": "tread", "start": 0, "end": 4}})
    attention = {**repa, "kind": "irepa", "projector": "attention"}  # the fact follows the option
    check({"repa": attention, "routing": {"kind": "tread", "start": 0, "end": 4}})
    with pytest.raises(ValueError, match=r"set repa.routed_target: gather"):
        check({"repa": attention, "routing": {"kind": "sprint", "start": 1, "end": 4}})
    with pytest.raises(ValueError, match=r"model.hidden_size 40 is not a multiple of 16, which the irepa"):
        check({"repa": attention, "model": {"hidden_size": 40, "num_heads": 2, "axes_dim": [10, 10]}})
    with pytest.raises(ValueError, match="remove repa.routed_target"):
        check({"repa": {**repa, "routed_target": "gather"}})
    with pytest.raises(
        ValueError, match="data.resolution 15 is not a multiple of the model's 2 px per token"
    ):
        check({"repa": repa, "data": {"resolution": 15}})
    with pytest.raises(ValueError, match="'dinov4'.*'dinov2-vitl14-reg'.*'tiny'"):  # valid kinds listed
        check({"repa": {**repa, "teacher": {"kind": "dinov4"}}})
    # the study's arms validate without any weights on this machine
    study = check(
        {
            "model": {"preset": "prx-1.2b"},
            "data": {"resolution": 256},
            "tokenizer": {"kind": "pixel"},
            "repa": {"kind": "repa", "teacher": {"kind": "dinov3-vitl16"}},
            "routing": {"kind": "tread"},
        }
    )
    assert study.repa.teacher.patch_size == 16 and study.repa.teacher.width == 1024 and study.repa.block == 7


IREPA_PRX = {  # iREPA as PRX's configs run it
    "kind": "irepa",
    "teacher": TINY_TEACHER,
    "block": 1,
    "projector": "attention",
    "target_norm": "per-token-mean",
}


@pytest.mark.parametrize(
    "over",
    [
        {"repa": {"kind": "repa", "teacher": TINY_TEACHER, "block": 1}},
        {"repa": {"kind": "irepa", "teacher": TINY_TEACHER, "block": 1, "stop_step": 4}},
        {
            "repa": {"kind": "repa", "teacher": TINY_TEACHER, "block": 1, "routed_target": "gather"},
            "routing": {"kind": "sprint", "start": 1, "end": 4},
        },
        {"repa": IREPA_PRX, "routing": {"kind": "tread", "start": 1, "end": 4}},
        # as PRX ran iREPA: its projector stored and trained in bf16
        {
            "repa": {**IREPA_PRX, "projector_dtype": "bf16"},
            "routing": {"kind": "tread", "start": 1, "end": 4},
        },
    ],
    ids=["repa", "irepa-stop4", "repa-in-sprint", "irepa-prx-in-tread", "irepa-prx-in-tread-bf16"],
)
def test_repa_run_trains_checkpoints_and_resumes_exactly(make_run, monkeypatch, over):
    cfg = dict(over, train={"steps": 8}, checkpoint={"every": 4, "keep": 3})
    straight, resumed = make_run("straight", **cfg), make_run("resumed", **cfg)
    job.run(straight)
    with crash_at(6), pytest.raises(KeyboardInterrupt):
        job.run(resumed)
    job.run(resumed)

    a, b = (load_file(checkpoint.latest(d) / "factors.safetensors") for d in (straight, resumed))
    i = len(over) - 1  # REPA's index among the factors (routing comes first)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a and all(
        k.startswith((f"{i}.projector.", "0.mask_token", "0.fuse.")) for k in a
    )  # no teacher weights
    first = load_file(checkpoint.complete(straight)[0] / "factors.safetensors")
    trained = not all(torch.equal(first[k], a[k]) for k in a if ".projector." in k)
    assert trained == ("stop_step" not in over["repa"])  # stop_step 4: no update after checkpoint 4
    assert logged_losses(straight) == logged_losses(resumed)


def test_projector_without_gradient_after_stop_step_is_fine_under_ddp():
    """A one-process gloo group: DDP raises on a parameter left without gradient unless told, as the trainer does."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1
    )
    try:
        repa = build_repa(REPAConfig(teacher=TINY_TEACHER, block=1, stop_step=1), CTX)
        den = Denoiser(build_prx(ModelConfig(preset="tiny"), 3, 32), [repa]).train()
        net = DDP(den, find_unused_parameters=repa.skips_params)
        images = torch.rand(2, 3, 16, 16)
        for step in range(3):
            out = net(
                images, torch.rand(2), torch.randn(2, 5, 32), None, inputs={"images": images, "step": step}
            )
            (out.pred.square().mean() + sum(out.losses.values())).backward()
            assert ("repa" in out.losses) == (step < 1)
    finally:
        torch.distributed.destroy_process_group()


def test_the_domain_teacher_is_the_attribute_net_on_the_token_grid(tiny_cfg, domain_cache):
    """REPA with a domain teacher: the synthetic domain's attribute net, its stride-4 features per token."""
    from trainer.data.synthetic import SyntheticConfig, attribute_net
    from trainer.factors.repa import DomainTeacherConfig, build_domain_teacher

    data = SyntheticConfig(resolution=16)
    ctx = FactorContext(**{**CTX.__dict__, "data": data, "cache_dir": str(domain_cache), "resolution": 16})
    teacher = build_domain_teacher(DomainTeacherConfig(), ctx)
    images = torch.rand(2, 3, 16, 16)
    tokens = teacher(images, (4, 4))  # a 4x4 token grid: the 16 px image as the net sees it
    net = attribute_net(data, domain_cache)  # trained once: loaded from the cache now
    expected = net.grid_features(images * 2 - 1).flatten(2).transpose(1, 2)
    assert tokens.shape == (2, 16, DomainTeacherConfig().width) and torch.allclose(tokens, expected)
    assert teacher(torch.rand(2, 3, 16, 16), (8, 8)).shape == (2, 64, 64)  # finer grids: the image is resized
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="trained on the synthetic-shapes domain, but data.kind 'parquet'"):
        TrainConfig.model_validate(merge(tiny_cfg, {
            "data": {"kind": "parquet", "path": "x.parquet", "caption": "c", "resolution": 16},
            "repa": {"kind": "repa", "block": 1, "teacher": {"kind": "domain"}},
        }))  # fmt: skip
