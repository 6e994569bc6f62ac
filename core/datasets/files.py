"""File helpers shared by several readers: finding a possibly gzipped file, reading images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.data import DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def find_file(root: Path, stem: str) -> Path:
    """``root/stem`` or ``root/stem.gz``: datasets are distributed both ways."""
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"missing {stem}[.gz] in {root}")


def images_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name so the order is reproducible.

    Hidden files are skipped: macOS archives carry a ``._name.png`` resource fork beside every
    image, which is not an image.
    """
    if not folder.is_dir():
        raise DatasetError(f"missing image folder {folder}")
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def stack_images(paths: list[Path], mode: str, where: Path) -> torch.Tensor:
    """Images read with Pillow in ``mode`` ("L" or "RGB") as a uint8 (N, C, H, W) tensor.

    All must have the same size (nothing is resized: a resize would change the pixels the
    attacks and defenses work on); ``where`` names the folder in the error if not.
    """
    arrays = [_read_image(p, mode) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DatasetError(f"images under {where} differ in size: {sorted(shapes)[:3]}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _read_image(path: Path, mode: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert(mode), dtype=np.uint8)
    # Missing, truncated or not an image (OSError), or a header claiming more pixels than
    # Pillow's decompression-bomb limit (an Exception of its own).
    except (OSError, Image.DecompressionBombError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error
    return array[:, :, None] if array.ndim == 2 else array
