"""Every metric of the table, through its real code path at small size (tiny extractors of the real
classes, a tiny trainer for val_loss): it is computed, and it moves the way the table says is better.
The ranking trusts the table's direction; here the numbers have to agree with it.

A metric added to the table without a case here fails `test_every_metric_has_a_case`.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from render_shapes import NUM_CLASSES, dataset

from core.rundir import RunDir
from eval.evaluator import Evaluator, Reference
from eval.metrics import ALWAYS, GENERATED, METRICS

N = 40


@pytest.fixture(scope="module")
def extractors(inception, clip, dino):
    from eval_testing import TinyFeature

    from eval.domain import DomainAttrExtractor, train_attribute_net
    from eval.extractors import InceptionPRXExtractor

    images, labels = dataset(300, seed=0)
    attr = DomainAttrExtractor(train_attribute_net(images, labels, NUM_CLASSES, seed=0, epochs=3))
    return {
        "inception": inception,
        "inception-prx": InceptionPRXExtractor(TinyFeature()),
        "clip-vit-l14-336": clip,
        "dinov2-vitl14-reg": dino,
        "domain-attr": attr,
    }


def noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def better(a: float, b: float, direction: str) -> bool:
    return a < b if direction == "lower" else a > b


@pytest.mark.parametrize("name", GENERATED)
def test_every_generation_metric_prefers_samples_like_the_reference(name, extractors, tmp_path):
    """Renders of the domain, asked for what they show, against noise asked for the same: the renders must
    score better in the table's direction."""
    metric = METRICS[name]
    real, _ = dataset(N, seed=1)
    good, asked = dataset(N, seed=2)
    ref = Reference("every-metric", N, lambda: real, tmp_path) if metric.needs_reference else None
    ev = Evaluator([name], ref, extractors={metric.extractor: extractors[metric.extractor]})
    on_good, on_noise = ev(good, requested=asked)[name], ev(noise(N, seed=3), requested=asked)[name]
    assert np.isfinite(on_good) and np.isfinite(on_noise)
    assert better(on_good, on_noise, metric.better), (name, metric.better, on_good, on_noise)


def test_val_loss_is_computed_for_every_arm_and_falls_as_it_trains(tmp_path):
    """The one metric that needs no generation: every eval step of an arm with no `eval.metrics` has it."""
    from trainer import job

    config = {
        "model": {"preset": "tiny"},
        "data": {"kind": "synthetic", "resolution": 16, "caption": "long", "num_train": 256, "num_val": 16},
        "text_encoder": {"kind": "tiny-t5", "d_model": 32, "max_length": 32},
        "tokenizer": {"kind": "pixel"},
        "optimizer": {"kind": "adamw", "lr": 1e-3},
        "precision": {"kind": "fp32"},
        "train": {"steps": 30, "batch_size": 4, "warmup_steps": 2, "threads": 1},
        "checkpoint": {"every": 30},
        "eval": {"every": 10, "batch_size": 8},
        "log": {"every": 10},
    }
    run = RunDir(tmp_path / "arm")
    run.path.mkdir()
    run.write_config(yaml.safe_dump(config))
    job.run(run.path)
    by_step = {step: metrics[ALWAYS] for step, metrics in run.metrics_by_step().items()}
    assert sorted(by_step) == [10, 20, 30]
    assert better(by_step[30], by_step[10], METRICS[ALWAYS].better)


def test_every_metric_has_a_case():
    assert set(METRICS) == {*GENERATED, ALWAYS}
    assert all(METRICS[m].better in ("lower", "higher") for m in METRICS)
