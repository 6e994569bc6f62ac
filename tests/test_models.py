"""core.models: every architecture, channel count and input size; normalization inside."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from core.models import FeatureClassifier, build_model

ARCHS = ("convnet", "resnet18", "resnet50")
FEATURE_DIM = {"convnet": 128, "resnet18": 512, "resnet50": 2048}
SIZES = (8, 28, 32)
MEAN = {1: (0.3,), 3: (0.1, 0.2, 0.3)}
STD = {1: (0.2,), 3: (0.3, 0.2, 0.1)}


_MODELS: dict[tuple[str, int], FeatureClassifier] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_models() -> Iterator[None]:
    yield
    _MODELS.clear()


def _model(arch: str, channels: int) -> FeatureClassifier:
    """One seeded model per (arch, channels), built once per module, in eval mode."""
    if (arch, channels) not in _MODELS:
        torch.manual_seed(0)
        model = build_model(
            arch, in_channels=channels, num_classes=7, mean=MEAN[channels], std=STD[channels]
        )
        _MODELS[arch, channels] = model.eval()
    return _MODELS[arch, channels]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_features_are_pooled_vectors_and_forward_is_head_of_features(
    arch: str, channels: int
) -> None:
    model = _model(arch, channels)
    assert model.feature_dim == FEATURE_DIM[arch]
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (FEATURE_DIM[arch], 7)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for size in SIZES:
            x = torch.rand(2, channels, size, size, generator=gen)
            features = model.features(x)
            logits = model(x)
            assert features.shape == (2, FEATURE_DIM[arch]), size
            assert logits.shape == (2, 7), size
            assert torch.isfinite(logits).all()
            torch.testing.assert_close(logits, model.head(features), rtol=0, atol=0)
            assert not torch.equal(features[0], features[1])  # depends on the input


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_normalization_is_the_models_first_step(arch: str, channels: int) -> None:
    model = _model(arch, channels)
    x = torch.rand(2, channels, 8, 8, generator=torch.Generator().manual_seed(2))
    mean = torch.tensor(MEAN[channels]).view(1, -1, 1, 1)
    std = torch.tensor(STD[channels]).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = torch.flatten(model.body((x - mean) / std), 1)
        unnormalized = torch.flatten(model.body(x), 1)
        features = model.features(x)
    torch.testing.assert_close(features, expected)
    assert not torch.allclose(features, unnormalized)  # so the check above has teeth


def test_default_normalization_is_half_and_quarter_per_channel() -> None:
    model = build_model("convnet", in_channels=3, num_classes=2)
    assert model.normalize.mean.flatten().tolist() == [0.5] * 3
    assert model.normalize.std.flatten().tolist() == [0.25] * 3
    assert model.normalize.mean.shape == (1, 3, 1, 1)


def test_normalization_is_saved_in_the_state_dict() -> None:
    state = _model("convnet", 3).state_dict()
    assert torch.allclose(state["normalize.mean"].flatten(), torch.tensor(MEAN[3]))
    assert torch.allclose(state["normalize.std"].flatten(), torch.tensor(STD[3]))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnets_have_the_cifar_stem_and_no_max_pool(arch: str) -> None:
    model = _model(arch, 3)
    stem = model.body[0]
    assert isinstance(stem, nn.Conv2d)
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.out_channels == 64
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.body.modules())
    assert isinstance(model.body[-1], nn.AdaptiveAvgPool2d)


@pytest.mark.parametrize(
    ("arch", "params"),
    # Kuang Liu's pytorch-cifar ResNet18() and ResNet50(), 10 classes: the paper's models.
    [("resnet18", 11_173_962), ("resnet50", 23_520_842)],
)
def test_resnet_parameter_counts_match_the_reference_cifar_models(arch: str, params: int) -> None:
    model = _model(arch, 3)
    body = sum(p.numel() for p in model.body.parameters())
    assert not list(model.normalize.parameters())  # mean and std are buffers, not trained
    assert body + model.feature_dim * 10 + 10 == params  # with a 10-class head


@pytest.mark.parametrize("arch", ["convnet", "resnet18"])
def test_input_gradient_flows_through_normalization(arch: str) -> None:
    model = _model(arch, 3)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    model.features(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_train_mode_updates_batch_norm_statistics() -> None:
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, num_classes=3).train()
    before = model.body[1].running_mean.clone()
    model(torch.rand(4, 1, 8, 8))
    assert not torch.equal(before, model.body[1].running_mean)


def test_unknown_arch_raises_value_error_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"convnet, resnet18, resnet50.*'vgg16'"):
        build_model("vgg16", in_channels=3, num_classes=10)


@pytest.mark.parametrize(
    ("mean", "std"),
    [((0.5, 0.5), None), (None, (0.2,)), ((0.5,) * 4, (0.2,) * 4)],
    ids=["mean-too-short", "std-too-short", "both-too-long"],
)
def test_normalization_of_the_wrong_length_raises_value_error(
    mean: tuple[float, ...] | None, std: tuple[float, ...] | None
) -> None:
    with pytest.raises(ValueError, match="3 values"):
        build_model("convnet", in_channels=3, num_classes=10, mean=mean, std=std)


@pytest.mark.parametrize("arch", ["convnet", "resnet18", "resnet50"])
def test_folded_batchnorm_computes_the_eval_model_and_follows_refresh(arch: str) -> None:
    from core.models import FoldedBatchNorm

    torch.manual_seed(0)
    model = build_model(arch, in_channels=3, num_classes=4)
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 16, 16))  # non-trivial running statistics
    model.eval()
    folded = FoldedBatchNorm(model)
    x = torch.rand(2, 3, 16, 16)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    assert not any(p.requires_grad for p in folded.model.parameters())
    with torch.no_grad():
        assert torch.allclose(folded.model.features(x), model.features(x), atol=1e-5)
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        stale = folded.model(x).clone()
        assert torch.allclose(folded.refresh()(x), model(x), atol=1e-5)
        assert not torch.allclose(stale, model(x), atol=1e-5)
