"""Dataset-independent pieces: the labelled image set, the paper's split, augmentation.

The readers live in :mod:`core.datasets`, one module per file format, registered against the
catalog's reader keys; every reader returns an :class:`ImageDataset` of uint8 tensors
(N, C, H, W), so everything here works the same whatever the files were.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from catalog.datasets import SplitConfig
from core.errors import BulwarkError, ErrorKind


class DatasetError(BulwarkError):
    """A dataset that cannot be read: missing files, a bad format, or too few images."""

    kind = ErrorKind.BAD_DATASET


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image set: uint8 pixels (N, C, H, W) and int64 labels (N,)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    flip: bool  # whether a horizontal flip keeps the label (not so for digits)

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Split:
    """Indices into the training set: pre-training, clean re-training, base pool."""

    pretrain: torch.Tensor
    retrain: torch.Tensor
    pool: torch.Tensor


def split_dataset(labels: torch.Tensor, counts: SplitConfig) -> Split:
    """The paper's split (Appendix A), by position within each class.

    For each class, in dataset order: the first ``counts.pretrain`` images pre-train, the
    next ``counts.retrain`` are the clean re-training set, the next ``counts.pool`` the base
    pool (``counts.pretrain`` 0: an audit-only split, re-training and pool from the start).
    Deterministic: no seed is involved. A class with too few images raises
    :class:`DatasetError` naming the class, its count and the split's fields.
    """
    parts: dict[str, list[torch.Tensor]] = {"pretrain": [], "retrain": [], "pool": []}
    need = counts.pretrain + counts.retrain + counts.pool
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        if len(idx) < need:
            raise DatasetError(
                f"class {cls} has {len(idx)} training images; the split needs {need} "
                f"(split.pretrain={counts.pretrain} + split.retrain={counts.retrain} "
                f"+ split.pool={counts.pool})"
            )
        a, b = counts.pretrain, counts.pretrain + counts.retrain
        parts["pretrain"].append(idx[:a])
        parts["retrain"].append(idx[a:b])
        parts["pool"].append(idx[b:need])
    return Split(**{name: torch.cat(chunks).sort().values for name, chunks in parts.items()})


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0,1], on the same device."""
    return x.float().div_(255.0)


def augment_padding(side: int) -> int:
    """The zero padding of the random crop for images of height ``side``: 4 px, or 1/8 of the
    side for small images (the most any shift of :func:`shift_and_flip` may move)."""
    return max(1, min(4, side // 8))


def shift_and_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, mirror: torch.Tensor | None
) -> torch.Tensor:
    """Per image, the crop of the zero-padded image at offset (dy, dx), then a horizontal flip.

    ``out[n, c, i, j] = x[n, c, i + dy[n], j + dx[n]]`` (0 outside the image), mirrored along
    the width where ``mirror[n]`` (None: no flip). ``x`` is (N, C, H, W); ``dy``, ``dx`` are
    integer tensors (N,) in [-p, p] with p = :func:`augment_padding` of H, and ``mirror`` a
    bool tensor (N,), all on ``x``'s device. Pure indexing, so it is exact in any dtype and
    differentiable in ``x``; :func:`augment` draws its shifts at random, the attacks' multi-draw
    crafting (``core.attacks.base``) gives one shift to a whole batch.
    """
    n, _, h, w = x.shape
    pad = augment_padding(h)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = ((dy + pad)[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = ((dx + pad)[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, channels, rows, cols]
    if mirror is not None:
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out


def augment(x: torch.Tensor, *, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (:func:`augment_padding`) and, if ``flip``, h-flip.

    ``x`` is a float batch (N, C, H, W) on any device; ``generator`` lives on that device, so
    the augmentation is deterministic for a seed and never leaves the device.
    """
    n, h = x.shape[0], x.shape[2]
    pad = augment_padding(h)
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    mirror = torch.rand(n, device=x.device, generator=generator) < 0.5 if flip else None
    return shift_and_flip(x, dy - pad, dx - pad, mirror)


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images in [0,1] units (std floored at 1e-3)."""
    pixels = to_float(x).transpose(0, 1).reshape(x.shape[1], -1)
    return pixels.mean(1).tolist(), pixels.std(1).clamp_min(1e-3).tolist()


def encode_png(image: torch.Tensor) -> bytes:
    """A (C, H, W) uint8 tensor as PNG bytes (used by tests and the poison grid)."""
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, "PNG")
    return buffer.getvalue()
