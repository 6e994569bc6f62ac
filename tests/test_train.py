"""Pre-training: the defenses shape the feature space as the paper says; runs resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from catalog import SplitConfig
from core.config import PretrainConfig, pretrain_config
from core.data import to_float
from core.datasets import load_dataset
from core.screen import screen
from core.train import TrainingError, pretrain


@pytest.fixture(scope="module")
def digits_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits")
    return to_float(data.test_x), data.test_y


def test_undefended_convnet_learns_digits(digits_extractor) -> None:
    manifest = digits_extractor("none").manifest
    assert manifest["pre_acc"] > 0.85  # ten classes: chance is 0.1
    assert manifest["defense"] == "none" and manifest["dataset"] == "digits"
    assert manifest["input_shape"] == [1, 8, 8]
    assert manifest["config"]["epochs"] == 3


@pytest.mark.slow  # seconds of CPU or a subprocess: out of make test-fast
def test_adversarial_training_shrinks_adversarial_feature_drift(
    digits_extractor, digits_test_set
) -> None:
    """Eq. 4b: `at` keeps f(x_adv) nearer f(x) than `none` under the same PGD.

    Same data and epochs for both; every second test image (all classes), 5 PGD steps. Over
    seeds 0-2 the ratios are 0.39-0.42 (drift) and 0.61-0.62 (normalized drift).
    """
    x, y = digits_test_set
    x, y = x[::2], y[::2]
    none = screen(digits_extractor("none").model, x, y, delta=25.5 / 255, steps=5)
    at = screen(digits_extractor("at", pgd_steps=2).model, x, y, delta=25.5 / 255, steps=5)
    assert at.drift < 0.75 * none.drift
    # Not by shrinking the whole feature space: relative to the class distances too.
    assert at.normalized_drift < 0.85 * none.normalized_drift


def test_prototype_conformity_loss_separates_classes(digits_extractor, digits_test_set) -> None:
    """Eq. 4a: `pcl` gives a larger inter-centroid / intra-class ratio than `none`."""
    x, y = digits_test_set
    none = screen(digits_extractor("none").model, x, y, steps=1)
    pcl = screen(digits_extractor("pcl", alpha=0.5).model, x, y, steps=1)
    assert pcl.separation > 1.05 * none.separation


def _tiny_at_pcl(**overrides: object) -> PretrainConfig:
    """A run that is small yet crosses everything a resume restores.

    20 images a class in 4 batches an epoch (shuffled and augmented by the run's generator),
    PGD with random starts, the PC-Loss switched on after epoch 1 (centroids and their
    optimizer) and the lr milestone after epoch 2, so after an interruption in epoch 2.
    """
    return pretrain_config(
        dataset="digits",
        defense="at-pcl",
        recipe="quick",
        split=SplitConfig(pretrain=20, retrain=1, pool=1),
        epochs=3,
        milestones=(2,),
        warmup_epochs=1,
        arch="convnet",
        batch_size=64,
        pgd_steps=2,
        seed=3,
        **overrides,
    )


class InterruptError(Exception):
    pass


def test_interrupted_then_resumed_run_ends_with_the_same_weights(tmp_path) -> None:
    config = _tiny_at_pcl()
    pretrain(config, out_dir=tmp_path / "straight")

    def stop_in_second_epoch(report) -> None:
        if report.epoch == 2 and report.step == 2:
            raise InterruptError

    with pytest.raises(InterruptError):
        pretrain(config, out_dir=tmp_path / "resumed", progress=stop_in_second_epoch)
    state = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert state["epochs_done"] == 1
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    epochs_seen = []
    pretrain(config, out_dir=tmp_path / "resumed", progress=lambda r: epochs_seen.append(r.epoch))
    assert min(e for e in epochs_seen if e is not None) == 2  # epoch 1 was not redone

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    manifests = [
        json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("straight", "resumed")
    ]
    assert manifests[0]["centroids"] == manifests[1]["centroids"]
    assert manifests[0]["pre_acc"] == manifests[1]["pre_acc"]


def test_resuming_with_another_config_is_refused(tmp_path) -> None:
    def stop(report) -> None:
        if report.epoch == 2:
            raise InterruptError

    with pytest.raises(InterruptError):
        pretrain(_tiny_at_pcl(), out_dir=tmp_path, progress=stop)
    with pytest.raises(TrainingError, match="different configuration"):
        pretrain(_tiny_at_pcl(alpha=0.4), out_dir=tmp_path)


def test_manifest_records_everything_needed_to_reproduce(digits_extractor) -> None:
    manifest = digits_extractor("pcl", alpha=0.5).manifest
    needed = {"arch", "classes", "input_shape", "normalization", "defense", "config", "dataset"}
    needed |= {"seed", "pre_acc", "weights_sha256", "versions", "split"}
    assert not needed - manifest.keys(), needed - manifest.keys()
    assert manifest["config"]["alpha"] == 0.5
    assert manifest["split"] == {"pretrain": 100, "retrain": 10, "pool": 25}
    assert len(manifest["centroids"]) == 10
