"""Image classifiers split into a feature extractor f(x) and one linear head.

The ResNets are the CIFAR-style ones of the paper's reference code (Kuang Liu's
pytorch-cifar): a 3x3 stride-1 stem and no max-pool, so 32x32 (or 28x28) inputs keep their
resolution into the first stage. The ConvNet is small enough to pre-train on a CPU in seconds.

Every model takes pixels in [0,1], shape (N, C, H, W); per-channel normalization is the
model's first layer, so every attack and defense budget is in pixel units. ``features(x)``
returns f(x), the pooled penultimate vector of shape (N, feature_dim); ``head`` is the single
``nn.Linear(feature_dim, num_classes)`` on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean and std stored as buffers in the checkpoint."""

    mean: torch.Tensor  # (1, C, 1, 1)
    std: torch.Tensor  # (1, C, 1, 1)

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class FeatureClassifier(nn.Module):
    """normalize -> body -> flattened feature vector f(x) -> linear head."""

    def __init__(
        self, arch: str, body: nn.Module, feature_dim: int, num_classes: int, normalize: Normalize
    ) -> None:
        super().__init__()
        self.arch = arch
        self.normalize = normalize
        self.body = body
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): (N, C, H, W) pixels in [0,1] -> (N, feature_dim)."""
        return torch.flatten(self.body(self.normalize(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


def _resnet_body(
    block: type[BasicBlock] | type[Bottleneck], blocks: Sequence[int], in_channels: int
) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
    ]
    in_planes = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            layers.append(block(in_planes, planes, stride))
            in_planes = planes * block.expansion
    layers.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers), in_planes


def _convnet_body(in_channels: int) -> tuple[nn.Module, int]:
    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

    body = nn.Sequential(
        *stage(in_channels, 32),
        *stage(32, 32),
        nn.MaxPool2d(2, ceil_mode=True),
        *stage(32, 64),
        *stage(64, 64),
        nn.MaxPool2d(2, ceil_mode=True),
        *stage(64, 128),
        nn.AdaptiveAvgPool2d(1),
    )
    return body, 128


def build_model(
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> FeatureClassifier:
    """A fresh ``arch`` model ("convnet", "resnet18" or "resnet50").

    Any input size works (the body ends in global average pooling); ``mean`` and ``std`` are
    the per-channel pixel statistics of the training data (default 0.5 and 0.25).
    """
    if arch == "convnet":
        body, dim = _convnet_body(in_channels)
    elif arch == "resnet18":
        body, dim = _resnet_body(BasicBlock, (2, 2, 2, 2), in_channels)
    elif arch == "resnet50":
        body, dim = _resnet_body(Bottleneck, (3, 4, 6, 3), in_channels)
    else:
        raise ValueError(f"arch must be one of convnet, resnet18, resnet50; got {arch!r}")
    mean = [0.5] * in_channels if mean is None else mean
    std = [0.25] * in_channels if std is None else std
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need {in_channels} values, one per input channel")
    return FeatureClassifier(arch, body, dim, num_classes, Normalize(mean, std))


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv name, batch-norm name) of every Conv2d directly followed by a BatchNorm2d.

    Covers the layouts of this module's models: consecutive entries of an ``nn.Sequential``
    and the ``convN``/``bnN`` attributes of the residual blocks.
    """
    pairs = []
    for name, child in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(child, nn.Sequential):
            entries = list(child.named_children())
            for (a, first), (b, second) in pairwise(entries):
                if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                    pairs.append((prefix + a, prefix + b))
        elif isinstance(child, BasicBlock | Bottleneck):
            for index in (1, 2, 3):
                if hasattr(child, f"conv{index}"):
                    pairs.append((f"{prefix}conv{index}", f"{prefix}bn{index}"))
    return pairs


class FoldedBatchNorm:
    """An inference copy of a model with every BatchNorm folded into the preceding conv.

    In eval mode a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals one conv
    with weight ``W * s`` and bias ``beta - mean * s`` (``s = gamma / sqrt(var + eps)``;
    torch's ``fuse_conv_bn_weights`` does the arithmetic). The copy computes the same
    function as ``source.eval()`` (to float rounding) with one pass over memory fewer per
    layer, which is what input-gradient loops (PGD, poison crafting) spend their time on. Its
    parameters never require grad. ``refresh()`` re-derives its weights from the source in
    place, cheaply, after the source was trained further.
    """

    def __init__(self, source: FeatureClassifier) -> None:
        import copy

        self.source = source
        self.model = copy.deepcopy(source).eval()
        self._pairs = _conv_bn_pairs(self.model)
        self._eps: dict[str, float] = {}
        for conv_name, bn_name in self._pairs:
            conv, bn = self.model.get_submodule(conv_name), self.model.get_submodule(bn_name)
            assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            self._eps[bn_name] = bn.eps
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device))
            parent, _, attr = bn_name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, attr, nn.Identity())
        self.model.requires_grad_(False)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> FeatureClassifier:
        """Copy the source's current weights and statistics in, folded; returns the model."""
        folded = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        source = dict(self.source.named_parameters()) | dict(self.source.named_buffers())
        folded_convs = {conv for conv, _ in self._pairs}
        for name, tensor in folded.items():
            if name.rpartition(".")[0] not in folded_convs:
                tensor.copy_(source[name])
        for conv_name, bn_name in self._pairs:
            weight, bias = fuse_conv_bn_weights(
                source[f"{conv_name}.weight"],
                source.get(f"{conv_name}.bias"),
                source[f"{bn_name}.running_mean"],
                source[f"{bn_name}.running_var"],
                self._eps[bn_name],
                source[f"{bn_name}.weight"],
                source[f"{bn_name}.bias"],
            )
            folded[f"{conv_name}.weight"].copy_(weight)
            folded[f"{conv_name}.bias"].copy_(bias)
            # Freed before the next layer's are made, the allocator reuses their memory instead
            # of mapping fresh pages: 8 ms instead of 19 ms for a ResNet-18 on one CPU thread.
            del weight, bias
        return self.model
