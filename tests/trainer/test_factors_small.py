"""EMA, contrastive flow matching and BF16 weights against their formulas."""

import json

import torch
import torch.nn.functional as F

from trainer import job
from trainer.contrastive import ContrastiveConfig, build_contrastive
from trainer.ema import EMAConfig, ModelEMA
from trainer.precision import BF16Config, FP32Config, build_bf16, build_fp32


def test_contrastive_term_is_minus_lambda_mse_to_rolled_targets():
    g = torch.Generator().manual_seed(0)
    v_pred, v_true = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    term = build_contrastive(ContrastiveConfig(weight=0.05))
    expected = -0.05 * ((v_pred - v_true[[3, 0, 1, 2]]) ** 2).mean()
    assert torch.allclose(term(v_pred, v_true), expected)
    assert torch.allclose(term(v_pred, v_true), -0.05 * F.mse_loss(v_pred, v_true.roll(1, 0)))


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
    assert not build_fp32(FP32Config(), cpu).autocast  # auto: off on CPU
    assert build_fp32(FP32Config(autocast="bf16"), cpu).autocast


def test_bf16_weights_train_and_store_bf16(make_run):
    d = make_run(
        precision={"kind": "bf16"}, ema={"kind": "ema", "decay": 0.9}, contrastive={"kind": "contrastive"}
    )
    result = job.run(d)
    assert result["metrics"]["val_loss"] > 0
    from safetensors.torch import load_file

    w = load_file(next((d / "checkpoints").iterdir()) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in w.values())
    state = torch.load(sorted((d / "checkpoints").iterdir())[-1] / "state.pt", weights_only=False)
    assert state["ema"]["shadow"] and json.loads((d / "status.json").read_text())["state"] == "done"
