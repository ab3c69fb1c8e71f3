import torch
import torch.nn.functional as F

from trainer import flow
from trainer.flow import FlowConfig


def test_sample_t_range_shift_and_uniform_share():
    cfg = FlowConfig(shift=3.0, uniform_fraction=0.1)
    t = flow.sample_t(200_000, cfg, torch.Generator().manual_seed(0))
    assert t.min() >= cfg.t_min and t.max() < 1
    # Reference: logit-normal through the shift, 10% replaced by uniform draws.
    g = torch.Generator().manual_seed(0)
    ref = flow.shift_t(torch.sigmoid(torch.randn(200_000, generator=g)), 3.0).clamp(1e-3, 1 - 1e-7)
    u = torch.rand(200_000, generator=g) * (1 - 1e-3) + 1e-3
    ref = torch.where(torch.rand(200_000, generator=g) < 0.1, u, ref)
    assert torch.equal(t, ref)
    # the shift pushes mass towards noise: sigmoid(N(0,1)) has median 0.5, shifted by 3 it is 0.75
    # (the 10% uniform share pulls the mixture's median a little lower)
    assert 0.72 < t.median().item() < 0.75


def test_shift_identity_at_one_and_fixed_points():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(flow.shift_t(t, 1.0), t)
    assert flow.shift_t(torch.tensor(0.0), 3.0) == 0 and flow.shift_t(torch.tensor(1.0), 3.0) == 1


def test_v_loss_is_plain_mse_against_noise_minus_x0():
    g = torch.Generator().manual_seed(1)
    x0, noise, pred = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0.1, 0.4, 0.7, 0.99])
    xt = flow.interpolate(x0, noise, t)
    assert torch.allclose(xt[1], 0.6 * x0[1] + 0.4 * noise[1])
    loss, _, _ = flow.loss(pred, x0, noise, xt, t, FlowConfig())
    assert torch.allclose(loss, ((pred - (noise - x0)) ** 2).mean())


def test_x_prediction_loss_in_v_space_with_clamped_t():
    g = torch.Generator().manual_seed(2)
    x0, noise, x0_hat = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.01, 0.5, 0.9])
    xt = flow.interpolate(x0, noise, t)
    cfg = FlowConfig(prediction="x")
    loss, _, _ = flow.loss(x0_hat, x0, noise, xt, t, cfg)
    tc = t.clamp(min=0.05).view(-1, 1, 1, 1)
    assert torch.allclose(loss, (((xt - x0_hat) / tc - (xt - x0) / tc) ** 2).mean())
    # a perfect x0 prediction has zero loss
    assert flow.loss(x0, x0, noise, xt, t, cfg)[0] < 1e-10


def test_euler_sampler_with_cfg_follows_the_exact_velocity_field():
    # With a net that returns the exact straight-line velocity for a single target, Euler
    # lands on the target from any noise; CFG with equal branches changes nothing.
    target = torch.randn(2, 3, 4, 4)

    def net(x, t, txt, mask):
        tt = t.view(-1, 1, 1, 1)
        x0 = torch.cat([target, target])
        return (x - x0) / tt  # v = ε - x0 = (x_t - x0) / t

    txt, mask = torch.zeros(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    out = flow.euler_sample(
        net,
        torch.randn(2, 3, 4, 4),
        txt,
        mask,
        txt[:1],
        mask[:1],
        FlowConfig(shift=3.0),
        steps=10,
        guidance=3.5,
    )
    assert torch.allclose(out, target, atol=1e-5)


def test_v_target_is_computed_in_the_dtype_of_x0_and_noise():
    # PRX's bf16 run: x0 and noise are bf16, so ε − x0 is rounded to bf16; fp32 t keeps x_t fp32
    # (its add_noise casts t to float); mse_loss under autocast compares in fp32.
    g = torch.Generator().manual_seed(4)
    x0, noise, pred = (torch.randn(4, 3, 8, 8, generator=g).bfloat16() for _ in range(3))
    t = torch.rand(4, generator=g)
    xt = flow.interpolate(x0, noise, t)
    assert xt.dtype == torch.float32
    loss, v_pred, v_true = flow.loss(pred, x0, noise, xt, t, FlowConfig())
    target = noise - x0  # (4, 3, 8, 8) bf16
    assert target.dtype == torch.bfloat16 and torch.equal(v_true, target.float())
    assert torch.equal(loss, F.mse_loss(pred.float(), target.float()))
    assert not torch.equal(v_true, noise.float() - x0.float())  # the bf16 rounding is really there


def test_euler_sampler_in_bf16_is_prx_bf16_loop():
    g = torch.Generator().manual_seed(3)
    noise, txt = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 8, generator=g)
    empty, mask = torch.zeros(1, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    seen = []  # (dtype of x, t) at every call of the net

    def net(x, t, txt, mask):  # like a bf16 net under autocast: the output is in x's dtype
        seen.append((x.dtype, t))
        return (0.5 * x - t.view(-1, 1, 1, 1) * txt.mean((1, 2)).view(-1, 1, 1, 1)).to(x.dtype)

    cfg, steps = FlowConfig(shift=3.0), 6
    grid = flow.shift_t(torch.linspace(1, 0, steps + 1), 3.0)  # (steps + 1,) fp32, as PRX's scheduler
    out = flow.euler_sample(
        net, noise, txt, mask, empty, mask[:1], cfg, steps=steps, guidance=3.5, dtype=torch.bfloat16
    )
    assert out.dtype == torch.bfloat16 and {d for d, _ in seen} == {torch.bfloat16}
    assert torch.equal(torch.stack([t[0] for _, t in seen]), grid[:-1].bfloat16())
    # PRX's bf16 loop: the state starts as bf16 noise, the net sees t cast to bf16, the guided
    # velocity u + s·(c − u) stays bf16, and each step subtracts dt·v with dt from the fp32 grid.
    x, ctx = noise.bfloat16(), torch.cat([txt, empty.expand(2, -1, -1)])
    for i in range(steps):
        v_c, v_u = net(torch.cat([x, x]), grid[i].repeat(4).bfloat16(), ctx, None).chunk(2)
        x = x - (grid[i] - grid[i + 1]) * (v_u + 3.5 * (v_c - v_u))
    assert x.dtype == torch.bfloat16 and torch.equal(out, x)

    seen.clear()  # the default: fp32 state and timesteps
    out32 = flow.euler_sample(net, noise, txt, mask, empty, mask[:1], cfg, steps=steps, guidance=3.5)
    assert out32.dtype == torch.float32 and {d for d, _ in seen} == {torch.float32}
    assert torch.equal(torch.stack([t[0] for _, t in seen]), grid[:-1])
    assert not torch.equal(out32, out.float())
