"""A torchvision-style ResNet-18, written here because torchvision cannot be imported on these
machines: what a model hub holds and Bulwark has no class for (7x7 stem, max-pool, fc).

Used by the tests of ``core.exported`` and of the hub flow over HTTP.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

SHAPE = (3, 32, 32)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision.models.resnet18's structure with stage widths ``widths``."""

    def __init__(
        self, widths: tuple[int, ...] = (8, 16, 32, 64), in_channels: int = 3, classes: int = 10
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], widths[0]
        for index, planes in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes))
            )
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.penultimate(x))


class Penultimate(nn.Module):
    """What a hub exports as a feature extractor: the network without its fc."""

    def __init__(self, net: ResNet18) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.penultimate(x)


def resnet(seed: int = 0, **kwargs: Any) -> ResNet18:
    """A ResNet-18 with random weights and random batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = ResNet18(**kwargs)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
    return model.eval()


def export(model: nn.Module, shape: tuple[int, ...] = (1, *SHAPE), **kwargs: Any) -> bytes:
    program = torch.export.export(model.eval(), (torch.rand(shape),), **kwargs)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()
