"""scikit-learn's bundled 8x8 digits (1797 images): real data with no files to fetch.

Too small for clean-label attacks to succeed, but fast: the unit tests of mechanics use it.
sklearn's 0..16 grey levels are scaled to 0..255; in dataset order, the first 80% of each
class train and the rest test (sklearn has no split of its own).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from catalog.datasets import DatasetSpec
from core.data import ImageDataset
from core.datasets.registry import class_names_for, register_reader


@register_reader("digits")
def read_digits(spec: DatasetSpec, root: Path | None) -> ImageDataset:
    """The digits set; ``root`` is ignored (the data ships inside scikit-learn)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8))
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    classes = class_names_for(spec, labels)
    train_mask = torch.zeros(len(labels), dtype=torch.bool)
    for cls in range(len(classes)):
        idx = torch.nonzero(labels == cls).flatten()
        train_mask[idx[: int(0.8 * len(idx))]] = True
    images = images[:, None]
    return ImageDataset(
        name=spec.name,
        train_x=images[train_mask],
        train_y=labels[train_mask],
        test_x=images[~train_mask],
        test_y=labels[~train_mask],
        classes=classes,
        flip=spec.flip,
    )
