"""EMA, contrastive flow matching and BF16 weights against their formulas."""

import json

import pytest
import torch
import torch.nn.functional as F
from trainer_testing import final_metrics

from trainer import job
from trainer.factors.contrastive import ContrastiveConfig, build_contrastive
from trainer.factors.ema import EMAConfig, ModelEMA
from trainer.factors.precision import BF16Config, FP32Config, build_bf16, build_fp32
from trainer.flow import Prediction


def test_contrastive_term_is_minus_lambda_mse_to_targets_rolled_within_groups():
    g = torch.Generator().manual_seed(0)
    v_pred, v_true = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)

    def term(cfg):  # the term reads only the velocities of the step's prediction
        built = build_contrastive(cfg)
        return lambda a, b: built(Prediction(a, b, a, torch.zeros(len(a)), a, lambda z: z))

    whole = term(ContrastiveConfig(weight=0.05, group=4))  # one group: PRX's roll by one
    expected = -0.05 * ((v_pred - v_true[[3, 0, 1, 2]]) ** 2).mean()
    assert torch.allclose(whole(v_pred, v_true), expected)
    assert torch.allclose(whole(v_pred, v_true), -0.05 * F.mse_loss(v_pred, v_true.roll(1, 0)))
    pairs = term(ContrastiveConfig(weight=0.05, group=2))  # groups {0, 1}, {2, 3}
    assert torch.allclose(pairs(v_pred, v_true), -0.05 * ((v_pred - v_true[[1, 0, 3, 2]]) ** 2).mean())
    # a process holding samples 2, 3 of the global batch computes its part of the same term
    assert torch.allclose(
        (pairs(v_pred[:2], v_true[:2]) + pairs(v_pred[2:], v_true[2:])) / 2, pairs(v_pred, v_true)
    )
    with pytest.raises(ValueError, match="contrastive.group 4 does not divide this process's 2 samples"):
        whole(v_pred[:2], v_true[:2])


def test_contrastive_groups_must_fit_the_per_process_batch(tiny_cfg):
    from trainer.config import TrainConfig

    cfg = TrainConfig.model_validate(
        {**tiny_cfg, "train": {"batch_size": 32}, "contrastive": {"kind": "contrastive", "group": 8}}
    )
    assert cfg.world_problems(4, 4) == []
    [(path, problem, expected)] = cfg.world_problems(8, 8)
    assert path == ("contrastive", "group") and expected == "a divisor of 4"
    assert problem.startswith(
        "contrastive.group 8 does not divide the per-process batch 4 (train.batch_size 32"
    )
    off = TrainConfig.model_validate({**tiny_cfg, "train": {"batch_size": 32}})
    assert off.world_problems(8, 8) == []  # contrastive off: no group to fit


def test_ema_update_and_swap():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(EMAConfig(decay=0.9, every=1), model)
    ema.update(0)  # first update copies
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(1)
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 2), 0.9 * 1.0 + 0.1 * 2.0))
    with ema.swapped():
        assert torch.allclose(model.weight, torch.full((2, 2), 1.1))
    assert torch.equal(model.weight, torch.full((2, 2), 2.0))  # restored


def test_precision_kinds():
    cpu = torch.device("cpu")
    assert build_fp32(FP32Config(), cpu).weights == torch.float32
    assert build_bf16(BF16Config(), cpu).weights == torch.bfloat16
    assert build_bf16(BF16Config(), cpu).flow == build_fp32(FP32Config(), cpu).flow == torch.float32
    assert build_bf16(BF16Config(flow_dtype="bf16"), cpu).flow == torch.bfloat16  # PRX's bf16 run
    assert not build_fp32(FP32Config(), cpu).autocast  # auto: off on CPU
    assert build_fp32(FP32Config(autocast="bf16"), cpu).autocast


def test_bf16_weights_train_and_store_bf16(make_run):
    d = make_run(
        precision={"kind": "bf16"},
        ema={"kind": "ema", "decay": 0.9},
        contrastive={"kind": "contrastive", "group": 4},
    )
    job.run(d)
    assert final_metrics(d)["val_loss"] > 0
    from safetensors.torch import load_file

    w = load_file(next((d / "checkpoints").iterdir()) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in w.values())
    state = torch.load(sorted((d / "checkpoints").iterdir())[-1] / "state.pt", weights_only=False)
    assert state["ema"]["shadow"] and json.loads((d / "status.json").read_text())["state"] == "done"


def test_prx_bf16_flow_trains_and_samples_in_bf16(tiny_cfg, tmp_path, monkeypatch):
    """`flow_dtype: bf16` through the trainer: train_step hands the loss bf16 x0 and noise (x_t and t
    fp32, as in PRX), generation samples with a bf16 state and bf16 timesteps; the default stays fp32."""
    from dataclasses import replace

    from trainer import flow
    from trainer.config import TrainConfig
    from trainer.data.sampling import StepBatchSampler
    from trainer.runtime.dist import Dist
    from trainer.train import Trainer

    tiny_cfg.update(
        precision={"kind": "bf16", "flow_dtype": "bf16"}, eval={**tiny_cfg["eval"], "sample_steps": 3}
    )
    tr = Trainer(TrainConfig.model_validate(tiny_cfg), tmp_path, Dist(0, 1, 0, torch.device("cpu")))
    seen, real_loss, real_sample = [], flow.loss, flow.euler_sample

    def loss(pred, x0, noise, xt, t, cfg):  # the real loss, recording the dtypes it is handed
        seen.append((x0.dtype, noise.dtype, xt.dtype, t.dtype))
        return real_loss(pred, x0, noise, xt, t, cfg)

    def euler_sample(*args, **kwargs):  # the real sampler, recording its state's dtype
        out = real_sample(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(flow, "loss", loss)
    monkeypatch.setattr(flow, "euler_sample", euler_sample)
    tr.denoiser.register_forward_pre_hook(lambda m, args: seen.append(args[1]) if not m.training else None)
    sampler = StepBatchSampler(len(tr.train_set), 4, 0, 0, 3)
    batches = list(torch.utils.data.DataLoader(tr.train_set, batch_sampler=sampler))
    bf16, fp32 = torch.bfloat16, torch.float32
    grid = flow.shift_t(torch.linspace(1, 0, 4), 1.0)[:-1]  # (3,) fp32 Euler grid
    prompt = tr.val_set[0]
    noise = torch.randn(
        1, *tr.sampler.latent_shape(prompt["image"].shape[-1]), generator=torch.Generator().manual_seed(0)
    )
    for flow_dtype in (bf16, fp32):
        tr.precision = tr.sampler.precision = replace(tr.precision, flow=flow_dtype)
        seen.clear()
        losses = [tr.train_step(s, batches[s])[0] for s in range(3)]
        assert all(torch.isfinite(x) for x in losses)
        assert seen == [(flow_dtype, flow_dtype, fp32, fp32)] * 3
        seen.clear()
        tr.denoiser.eval()
        assert tr.sampler([prompt["caption"]], noise).shape == (1, 3, 16, 16)
        tr.denoiser.train()
        assert seen[-1] == flow_dtype and len(seen) == 4  # three net calls, then the sampler's output
        assert torch.equal(torch.stack([t[0] for t in seen[:3]]), grid.to(flow_dtype))
