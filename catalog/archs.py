"""Architectures: the feature extractors Bulwark can build, and how to recognise their weights.

A torch builder registers against each entry in ``core.models``. ``recognize`` works on tensor
names alone, so the API (without torch, from a safetensors header) and the core (from a state
dict) tell architectures apart by the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from catalog.registry import Catalog

TensorNames = Collection[str]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    title: str
    # True when a state dict with these tensor names is this architecture; the rules of the
    # entries exclude each other, so at most one matches.
    recognize: Callable[[TensorNames], bool]
    min_input_size: int = 1  # smallest height/width the network accepts


def _is_resnet(names: TensorNames) -> bool:
    return "body.3.conv1.weight" in names


def _has_bottlenecks(names: TensorNames) -> bool:
    return any(".conv3." in name for name in names)


ARCHS: Catalog[ArchSpec] = Catalog(
    "arch",
    [
        ArchSpec(
            name="convnet",
            title="a small 5-conv network for CPUs, 128-d features",
            recognize=lambda names: "body.0.weight" in names and not _is_resnet(names),
        ),
        ArchSpec(
            name="resnet18",
            title="CIFAR-style ResNet-18 (3x3 stem, no max-pool), 512-d features",
            recognize=lambda names: _is_resnet(names) and not _has_bottlenecks(names),
        ),
        ArchSpec(
            name="resnet50",
            title="CIFAR-style ResNet-50 (3x3 stem, no max-pool), 2048-d features",
            recognize=lambda names: _is_resnet(names) and _has_bottlenecks(names),
        ),
    ],
)

STEM_WEIGHT, HEAD_WEIGHT = "body.0.weight", "head.weight"


def recognize_arch(names: TensorNames) -> str | None:
    """The name of the first architecture whose rule matches ``names``, or None."""
    if STEM_WEIGHT not in names or HEAD_WEIGHT not in names:
        return None
    return next((arch.name for arch in ARCHS.entries() if arch.recognize(names)), None)
