"""The 1024-px study's pixel-space path at CPU size (sweeps/prx-pixel-1024.yaml in miniature): identity
tokenizer, bottleneck patch embedding, x-prediction with timestep shift 3, through the real trainer,
sampler, evaluation and checkpoints."""

import json
import math

import pytest
import torch
from diffusers import PRXTransformer2DModel
from safetensors.torch import load_file
from trainer_testing import crash_at, logged_losses, metrics_by_step

from trainer import job
from trainer.runtime import checkpoint


def pixel_run(make_run, name, cache_dir):
    return make_run(
        name,
        # 4×4×3 = 48 values per patch → bottleneck 8 → hidden 64, on the 16-px synthetic domain (16 tokens)
        model={"preset": "tiny", "patch_size": 4, "bottleneck_size": 8},
        flow={"prediction": "x", "shift": 3.0},
        train={"steps": 10},
        checkpoint={"every": 4, "keep": 5},
        eval={
            "every": 5,
            "metrics": ["domain_fd", "prompt_adherence"],
            "samples": 8,
            "sample_steps": 4,
            "grid": 8,
            "cache_dir": str(cache_dir),  # the 16-px attribute net, trained once per session
        },
        log={"every": 1},
    )


def test_pixel_x_prediction_trains_samples_and_resumes_exactly(make_run, domain_cache):
    straight = pixel_run(make_run, "straight", domain_cache)
    job.run(straight)
    losses = logged_losses(straight)
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    by_step = metrics_by_step(straight)
    assert by_step[10]["val_loss"] < by_step[5]["val_loss"]  # x-prediction learns from its zero start
    for step in (5, 10):  # sampled with x-prediction and the shifted schedule, scored on the samples
        assert math.isfinite(by_step[step]["domain_fd"]) and 0 <= by_step[step]["prompt_adherence"] <= 1
        assert json.loads((straight / "eval" / f"step_{step}.json").read_text())["generated_samples"] == 8
        assert (straight / "eval" / f"step_{step}.png").exists()

    # the bottleneck is part of diffusers' class: the checkpoint loads whole, with no weight left out
    saved = checkpoint.latest(straight) / "transformer"
    model = PRXTransformer2DModel.from_pretrained(saved)
    assert model.config.bottleneck_size == 8 and model.config.in_channels == 3
    weights = load_file(saved / "diffusion_pytorch_model.safetensors")
    assert {"img_in.0.weight", "img_in.1.weight"} <= set(weights)
    loaded = model.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)

    resumed = pixel_run(make_run, "resumed", domain_cache)
    with crash_at(6), pytest.raises(KeyboardInterrupt):  # killed mid-run, after checkpoint 4
        job.run(resumed)
    assert checkpoint.latest(resumed).name == "step_00000004"
    job.run(resumed)
    other = load_file(checkpoint.latest(resumed) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert other.keys() == weights.keys() and all(torch.equal(weights[k], other[k]) for k in weights)
    assert metrics_by_step(resumed) == by_step  # same weights, same eval noise: the same samples and scores
