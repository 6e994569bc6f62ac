"""Architectures: the feature extractors Bulwark can build, and how to recognise their weights.

A torch builder registers against each entry in ``core.models``. ``recognize`` works on tensor
names alone, so the API (without torch, from a safetensors header) and the core (from a state
dict) tell architectures apart by the same rule. ``expected_tensors`` is the exact state dict
(every name and shape) the builder makes, written layer by layer without torch, and
``compare_tensors`` checks weights against it: the API refuses an upload that would not load,
and the core words its refusal the same way. ``tests/test_arch_catalog.py`` compares the
table with ``core.models.build_model``'s state dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

from catalog.registry import Catalog

TensorNames = Collection[str]
Shape = tuple[int, ...]
Shapes = dict[str, Shape]
# A body's tensors (names relative to ``body.``) and its feature size, given the input channels.
BodyLayout = Callable[[int], tuple[Shapes, int]]
DtypeKind = Literal["floating", "integer", "other"]

STEM_WEIGHT, HEAD_WEIGHT, HEAD_BIAS = "body.0.weight", "head.weight", "head.bias"
# Optional as a pair: where the weights hold no normalization, the upload's mean/std stand in.
NORMALIZE_BUFFERS = ("normalize.mean", "normalize.std")
STEP_COUNTER = "num_batches_tracked"  # batch norm's step count: the one integer tensor
SHOWN_PER_KIND = 5  # names listed per kind of mismatch; the count says how many in all


@dataclass(frozen=True)
class ArchSpec:
    name: str
    title: str
    # True when a state dict with these tensor names is this architecture; the rules of the
    # entries exclude each other, so at most one matches.
    recognize: Callable[[TensorNames], bool]
    # The body's tensors, mirroring the torch builder in core.models layer by layer.
    body: BodyLayout
    min_input_size: int = 1  # smallest height/width the network accepts

    def expected_tensors(self, in_channels: int, num_classes: int) -> Shapes:
        """Name -> shape of every tensor in the state dict of
        ``core.models.build_model(self.name, in_channels=..., num_classes=...)``: the
        normalization buffers (1, C, 1, 1), the body's parameters and batch-norm buffers
        (``num_batches_tracked`` has shape ()), and the head (num_classes, feature_dim)."""
        body, feature_dim = self.body(in_channels)
        return {
            **dict.fromkeys(NORMALIZE_BUFFERS, (1, in_channels, 1, 1)),
            **{f"body.{name}": shape for name, shape in body.items()},
            HEAD_WEIGHT: (num_classes, feature_dim),
            HEAD_BIAS: (num_classes,),
        }

    @property
    def feature_dim(self) -> int:
        """The size of f(x), the head's input (it does not depend on the input channels)."""
        return self.body(1)[1]


# The layers of core.models, as tensor names and shapes (every conv there has bias=False).


def _conv(name: str, cin: int, cout: int, kernel: int) -> Shapes:
    return {f"{name}.weight": (cout, cin, kernel, kernel)}


def _batch_norm(name: str, channels: int) -> Shapes:
    stats = ("weight", "bias", "running_mean", "running_var")
    return {f"{name}.{stat}": (channels,) for stat in stats} | {f"{name}.{STEP_COUNTER}": ()}


def _convnet_body(in_channels: int) -> tuple[Shapes, int]:
    """core.models._convnet_body: five (conv 3x3, bn, relu) stages in one nn.Sequential, with
    max-pools at indices 6 and 13 and the global pool at 17."""
    shapes: Shapes = {}
    widths = (in_channels, 32, 32, 64, 64, 128)
    for index, (cin, cout) in zip((0, 3, 7, 10, 14), pairwise(widths), strict=True):
        shapes |= _conv(f"{index}", cin, cout, 3) | _batch_norm(f"{index + 1}", cout)
    return shapes, widths[-1]


def _shortcut(prefix: str, in_planes: int, out_planes: int, stride: int) -> Shapes:
    if stride == 1 and in_planes == out_planes:
        return {}  # nn.Identity
    return _conv(f"{prefix}.shortcut.0", in_planes, out_planes, 1) | _batch_norm(
        f"{prefix}.shortcut.1", out_planes
    )


def _basic_block(prefix: str, in_planes: int, planes: int, stride: int) -> tuple[Shapes, int]:
    """core.models.BasicBlock: conv 3x3, bn, conv 3x3, bn, shortcut; expansion 1."""
    shapes = _conv(f"{prefix}.conv1", in_planes, planes, 3) | _batch_norm(f"{prefix}.bn1", planes)
    shapes |= _conv(f"{prefix}.conv2", planes, planes, 3) | _batch_norm(f"{prefix}.bn2", planes)
    return shapes | _shortcut(prefix, in_planes, planes, stride), planes


def _bottleneck(prefix: str, in_planes: int, planes: int, stride: int) -> tuple[Shapes, int]:
    """core.models.Bottleneck: conv 1x1, bn, conv 3x3, bn, conv 1x1, bn, shortcut; expansion 4."""
    out_planes = planes * 4
    shapes = _conv(f"{prefix}.conv1", in_planes, planes, 1) | _batch_norm(f"{prefix}.bn1", planes)
    shapes |= _conv(f"{prefix}.conv2", planes, planes, 3) | _batch_norm(f"{prefix}.bn2", planes)
    shapes |= _conv(f"{prefix}.conv3", planes, out_planes, 1)
    shapes |= _batch_norm(f"{prefix}.bn3", out_planes)
    return shapes | _shortcut(prefix, in_planes, out_planes, stride), out_planes


Block = Callable[[str, int, int, int], tuple[Shapes, int]]


def _resnet_body(block: Block, blocks: Sequence[int]) -> BodyLayout:
    """core.models._resnet_body: a 3x3 stem (conv, bn, relu at indices 0-2), then one
    nn.Sequential entry per block, the first of stages 2-4 with stride 2, then the pool."""

    def layout(in_channels: int) -> tuple[Shapes, int]:
        shapes = _conv("0", in_channels, 64, 3) | _batch_norm("1", 64)
        in_planes, index = 64, 3
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            for position in range(count):
                stride = 2 if stage > 0 and position == 0 else 1
                block_shapes, in_planes = block(f"{index}", in_planes, planes, stride)
                shapes |= block_shapes
                index += 1
        return shapes, in_planes

    return layout


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
            body=_convnet_body,
        ),
        ArchSpec(
            name="resnet18",
            title="CIFAR-style ResNet-18 (3x3 stem, no max-pool), 512-d features",
            recognize=lambda names: _is_resnet(names) and not _has_bottlenecks(names),
            body=_resnet_body(_basic_block, (2, 2, 2, 2)),
        ),
        ArchSpec(
            name="resnet50",
            title="CIFAR-style ResNet-50 (3x3 stem, no max-pool), 2048-d features",
            recognize=lambda names: _is_resnet(names) and _has_bottlenecks(names),
            body=_resnet_body(_bottleneck, (3, 4, 6, 3)),
        ),
    ],
)


def recognize_arch(names: TensorNames) -> str | None:
    """The name of the first architecture whose rule matches ``names``, or None."""
    if STEM_WEIGHT not in names or HEAD_WEIGHT not in names:
        return None
    return next((arch.name for arch in ARCHS.entries() if arch.recognize(names)), None)


@dataclass(frozen=True)
class TensorFacts:
    """What a weights file says of one tensor, without reading its data."""

    shape: Shape
    dtype: str  # as the file spells it: "F32", "I64" (safetensors), "float32" (torch)
    kind: DtypeKind


def expected_kind(name: str) -> DtypeKind:
    """Batch norm's ``num_batches_tracked`` counts steps (integer); every other tensor of
    Bulwark's architectures is a floating-point parameter or buffer."""
    return "integer" if name.rpartition(".")[2] == STEP_COUNTER else "floating"


@dataclass(frozen=True)
class TensorMismatch:
    """How weights differ from an architecture's state dict; empty (``fits``) when they load."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    wrong_shape: tuple[tuple[str, Shape, Shape], ...] = ()  # (name, found, expected)
    wrong_dtype: tuple[tuple[str, str, DtypeKind], ...] = ()  # (name, found, expected kind)

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype)

    def problems(self) -> list[str]:
        """One line per kind of mismatch: how many, and the first ``SHOWN_PER_KIND`` of them."""
        lines = []
        if self.wrong_shape:
            shapes = [f"{n} is {found}, expected {want}" for n, found, want in self.wrong_shape]
            lines.append(_listed(shapes, "wrong shape"))
        if self.missing:
            lines.append(_listed(self.missing, "missing tensor"))
        if self.unexpected:
            lines.append(_listed(self.unexpected, "unexpected tensor"))
        if self.wrong_dtype:
            dtypes = [f"{n} is {found}, expected {kind}" for n, found, kind in self.wrong_dtype]
            lines.append(_listed(dtypes, "wrong dtype"))
        return lines


def _listed(items: Sequence[str], what: str) -> str:
    more = len(items) - SHOWN_PER_KIND
    shown = "; ".join(items[:SHOWN_PER_KIND]) + (f"; and {more} more" if more > 0 else "")
    return f"{len(items)} {what}{'' if len(items) == 1 else 's'}: {shown}"


def compare_tensors(
    expected: Mapping[str, Shape], found: Mapping[str, TensorFacts]
) -> TensorMismatch:
    """Every difference between the tensors ``found`` in a weights file and ``expected``
    (``ArchSpec.expected_tensors``): names missing or unexpected, shapes, and dtypes
    (``expected_kind``). The normalization buffers may be absent, both together."""
    absent_ok = set() if any(n in found for n in NORMALIZE_BUFFERS) else set(NORMALIZE_BUFFERS)
    wrong_shape, wrong_dtype = [], []
    for name, shape in expected.items():
        facts = found.get(name)
        if facts is None:
            continue
        if facts.shape != shape:
            wrong_shape.append((name, facts.shape, shape))
        if facts.kind != (kind := expected_kind(name)):
            wrong_dtype.append((name, facts.dtype, kind))
    return TensorMismatch(
        missing=tuple(n for n in expected if n not in found and n not in absent_ok),
        unexpected=tuple(n for n in found if n not in expected),
        wrong_shape=tuple(wrong_shape),
        wrong_dtype=tuple(wrong_dtype),
    )


def foreign_weights_message(names: Collection[str]) -> str:
    """Why weights whose tensor names fit none of the architectures are refused, and what to
    upload instead (shared by the API's check and the core's loader). The names shown are
    the first few in sorted order, batch-norm statistics left out, which tells most layouts
    apart (``bn1.bias, bn1.weight, conv1.weight, fc.bias, fc.weight`` is torchvision's)."""
    statistics = ("running_mean", "running_var", STEP_COUNTER)
    telling = sorted(n for n in names if n.rpartition(".")[2] not in statistics) or sorted(names)
    more = ", ..." if len(telling) > SHOWN_PER_KIND else ""
    shown = ", ".join(telling[:SHOWN_PER_KIND]) + more
    return (
        f"not a Bulwark model: its {len(names)} tensors ({shown}) are not one of Bulwark's "
        f"architectures ({', '.join(ARCHS)}: state dicts of core.models, with a 4-D "
        f"{STEM_WEIGHT} and a 2-D {HEAD_WEIGHT}); for any other architecture, export it with "
        "torch.export and upload the .pt2"
    )
