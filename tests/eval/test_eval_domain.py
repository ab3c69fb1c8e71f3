"""The demo domain's attribute net and its metrics, on renders made by a small renderer of our own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from render_shapes import NUM_CLASSES, dataset, render, sample_labels

from eval.distances import frechet_distance, mmd
from eval.domain import (
    DomainAttrExtractor,
    DomainData,
    adherence,
    get_or_train_attribute_net,
    load_attribute_net,
    save_attribute_net,
    train_attribute_net,
)
from eval.extractors import load_extractor


@pytest.fixture(scope="module")
def trained() -> DomainAttrExtractor:
    images, labels = dataset(1200, seed=0)
    return DomainAttrExtractor(train_attribute_net(images, labels, NUM_CLASSES, seed=0, epochs=10))


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return dataset(600, seed=100)


def test_attribute_net_classifies_held_out_renders(trained, held_out):
    images, labels = held_out
    predicted = trained.predict(images)
    accuracy = {attr: float((predicted[attr] == labels[attr]).mean()) for attr in NUM_CLASSES}
    assert min(accuracy.values()) > 0.9, accuracy


def test_prompt_adherence_true_vs_shuffled_attributes(trained, held_out):
    images, labels = held_out
    shuffled = {attr: np.random.default_rng(1).permutation(y) for attr, y in labels.items()}
    assert trained.prompt_adherence(images, labels) > 0.95
    assert trained.prompt_adherence(images, shuffled) < 0.5


def test_domain_distances_real_vs_real_small_real_vs_noise_large(trained, held_out):
    real_a = trained.features(held_out[0])
    real_b = trained.features(dataset(600, seed=200)[0])
    noise = trained.features(np.random.default_rng(3).integers(0, 256, (600, 32, 32, 3), dtype=np.uint8))
    wrong_colours = dict(sample_labels(600, seed=300), colour=np.zeros(600, dtype=int))  # every shape red
    biased = trained.features(render(wrong_colours, seed=301))
    fd_real, fd_biased, fd_noise = (frechet_distance(real_a, x) for x in (real_b, biased, noise))
    assert fd_real < 0.1 * fd_biased and fd_biased < fd_noise
    mmd_real, mmd_biased, mmd_noise = (mmd(real_a, x) for x in (real_b, biased, noise))
    assert mmd_real < 0.1 * mmd_biased and mmd_biased < mmd_noise


def test_adherence_counts_only_requested_attributes():
    predicted = {"shape": np.array([0, 1, 2, 0]), "colour": np.array([3, 3, 3, 3])}
    requested = {"shape": np.array([0, 1, -1, 2]), "colour": np.array([-1, 3, 1, -1])}
    assert adherence(predicted, requested) == pytest.approx(3 / 5)  # shape 2/3 right, colour 1/2
    with pytest.raises(ValueError, match="no classifier head"):
        adherence(predicted, {"texture": np.zeros(4, int)})
    with pytest.raises(ValueError, match="at least one requested"):
        adherence(predicted, {"shape": -np.ones(4, int)})


def test_training_is_deterministic_and_leaves_global_rng_alone():
    images, labels = dataset(200, seed=5)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_attribute_net(images, labels, NUM_CLASSES, seed=7, epochs=2)
    assert torch.rand(1) == before  # training did not consume the caller's RNG
    b = train_attribute_net(images, labels, NUM_CLASSES, seed=7, epochs=2)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name


def test_save_load_round_trip_and_registry_load(trained, held_out, tmp_path):
    path = save_attribute_net(trained.net, tmp_path / "domain-attr-test.pt", key={"renderer": "test"})
    assert path.with_suffix(".json").exists()
    reloaded = DomainAttrExtractor(load_attribute_net(path))
    assert reloaded.version == trained.version
    np.testing.assert_array_equal(reloaded.features(held_out[0][:20]), trained.features(held_out[0][:20]))
    from_registry = load_extractor("domain-attr", tmp_path)
    assert from_registry.version == trained.version


def test_get_or_train_trains_once_per_key(tmp_path):
    calls = []

    def make_data() -> DomainData:
        calls.append(1)
        images, labels = dataset(100, seed=9)
        return DomainData(images, labels, NUM_CLASSES)

    key = {"renderer": "test-shapes", "resolution": 32, "n": 100}
    first = get_or_train_attribute_net(tmp_path, key, make_data, epochs=1)
    second = get_or_train_attribute_net(tmp_path, key, make_data, epochs=1)
    assert len(calls) == 1
    assert DomainAttrExtractor(first).version == DomainAttrExtractor(second).version
    get_or_train_attribute_net(tmp_path, {**key, "n": 101}, make_data, epochs=1)
    assert len(calls) == 2 and len(list(tmp_path.glob("domain-attr-*.pt"))) == 2


def test_wrong_image_size_and_bad_labels_are_rejected(trained):
    with pytest.raises(ValueError, match="trained on"):
        trained.features(np.zeros((1, 16, 16, 3), np.uint8))
    images, labels = dataset(10, seed=1)
    with pytest.raises(ValueError, match="labels\\['size'\\]"):
        train_attribute_net(images, {**labels, "size": labels["size"] + 5}, NUM_CLASSES)
