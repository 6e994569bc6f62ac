"""Tiny ImageNet: its ``tiny-imagenet-200`` folder, 200 classes of 64x64 JPEGs.

The layout: ``wnids.txt`` (one WordNet id per class, in label order), ``words.txt`` (id, tab,
names), ``train/<wnid>/images/*.JPEG``, and ``val/val_annotations.txt`` (file, tab, wnid, box)
with ``val/images/``. The labelled ``val`` set is the test set (``test`` has no labels).
"""

from __future__ import annotations

from pathlib import Path

import torch

from catalog.datasets import DatasetSpec
from core.data import DatasetError, ImageDataset
from core.datasets.files import images_in, stack_images
from core.datasets.registry import need_dir, register_reader


@register_reader("tiny-imagenet")
def read_tiny_imagenet(spec: DatasetSpec, root: Path | None) -> ImageDataset:
    """The folder (or its ``tiny-imagenet-200`` sub-folder); classes named from ``words.txt``.

    Each class is named by the first of its WordNet names, or by its wnid without
    ``words.txt``. The few greyscale JPEGs are read as RGB, three equal channels.
    """
    folder = need_dir(spec, root)
    if (folder / "tiny-imagenet-200").is_dir():
        folder = folder / "tiny-imagenet-200"
    wnids_file = folder / "wnids.txt"
    if not wnids_file.is_file():
        raise DatasetError(f"{folder} is not a Tiny ImageNet folder: wnids.txt is missing")
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    index = {wnid: i for i, wnid in enumerate(wnids)}
    classes = tuple(wnids)
    words = folder / "words.txt"
    if words.is_file():
        lookup = dict(
            line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line
        )
        classes = tuple(lookup.get(w, w).split(",")[0].strip() for w in wnids)

    train_paths, train_labels = [], []
    for wnid in wnids:
        found = images_in(folder / "train" / wnid / "images")
        train_paths += found
        train_labels += [index[wnid]] * len(found)
    annotations = folder / "val" / "val_annotations.txt"
    if not train_paths or not annotations.is_file():
        raise DatasetError(f"{folder} needs train/<wnid>/images/ and val/val_annotations.txt")
    test_paths, test_labels = [], []
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[1] in index:
            test_paths.append(folder / "val" / "images" / fields[0])
            test_labels.append(index[fields[1]])
    return ImageDataset(
        name=spec.name,
        train_x=stack_images(train_paths, "RGB", folder / "train"),
        train_y=torch.tensor(train_labels, dtype=torch.int64),
        test_x=stack_images(test_paths, "RGB", folder / "val"),
        test_y=torch.tensor(test_labels, dtype=torch.int64),
        classes=classes,
        flip=spec.flip,
    )
