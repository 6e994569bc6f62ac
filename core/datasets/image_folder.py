"""Any image folder: ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val``).

Classes are the sub-folders of ``train`` in sorted order (label = position); images are read
with Pillow, all at their own size (they must agree), greyscale if the first image is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from catalog.datasets import DatasetSpec
from core.data import DatasetError, ImageDataset
from core.datasets.files import images_in, stack_images
from core.datasets.registry import need_dir, register_reader


@register_reader("image-folder")
def read_image_folder(spec: DatasetSpec, root: Path | None) -> ImageDataset:
    """The folder's train and test splits; the dataset is named after the folder.

    The folder's name, not the catalog entry's, names the result: it is what the user's
    reports and checkpoints should say they were trained on.
    """
    folder = need_dir(spec, root)
    test_root = next((folder / d for d in ("test", "val") if (folder / d).is_dir()), None)
    if not (folder / "train").is_dir() or test_root is None:
        raise DatasetError(
            f"image folder {folder} needs train/<class>/ and test/<class>/ (or val/)"
        )
    classes = spec.class_names or tuple(
        sorted(d.name for d in (folder / "train").iterdir() if d.is_dir())
    )
    if len(classes) < 2:
        raise DatasetError(f"{folder / 'train'} needs at least two class sub-folders")
    first = next((p for c in classes for p in images_in(folder / "train" / c)), None)
    if first is None:
        raise DatasetError(f"no images under {folder / 'train'}")
    mode = _image_mode(first)

    def read(split_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        paths, labels = [], []
        for index, cls in enumerate(classes):
            found = images_in(split_root / cls) if (split_root / cls).is_dir() else []
            paths += found
            labels += [index] * len(found)
        if not paths:
            raise DatasetError(f"no images under {split_root}")
        return stack_images(paths, mode, split_root), torch.tensor(labels, dtype=torch.int64)

    train_x, train_y = read(folder / "train")
    test_x, test_y = read(test_root)
    return ImageDataset(folder.name, train_x, train_y, test_x, test_y, classes, flip=spec.flip)


def _image_mode(sample: Path) -> str:
    """The Pillow mode for the whole set: greyscale ("L") if the first image is, else RGB."""
    from PIL import Image

    try:
        with Image.open(sample) as image:
            return "L" if image.mode in ("L", "1", "I", "I;16") else "RGB"
    except (OSError, Image.DecompressionBombError) as error:  # corrupt, not an image, a bomb
        raise DatasetError(f"{sample} is not a readable image: {error}") from None
