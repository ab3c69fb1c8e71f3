import torch

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
