"""IDX files (MNIST, Fashion-MNIST): ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

The format (LeCun's MNIST page): two zero bytes, a type code, the number of dimensions, then
each dimension as a big-endian uint32, then the data, big-endian. Files may be gzipped, as
they are distributed and as Debian's ``dataset-fashion-mnist`` installs them.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from catalog.datasets import DatasetSpec
from core.data import DatasetError, ImageDataset
from core.datasets.files import find_file
from core.datasets.registry import class_names_for, need_dir, register_reader

_IDX_TYPES: dict[int, np.dtype] = {
    code: np.dtype(name)
    for code, name in (
        (0x08, "u1"),
        (0x09, "i1"),
        (0x0B, ">i2"),
        (0x0C, ">i4"),
        (0x0D, ">f4"),
        (0x0E, ">f8"),
    )
}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (plain or gzipped) as a numpy array of its declared shape and dtype.

    Every length is checked against the header, so a truncated download is an error naming
    the file rather than a reshape failure later.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DatasetError(f"{path} is not a readable gzip file: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: IDX header declares {ndim} dimensions but is truncated")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise DatasetError(f"{path}: header says shape {shape} but the data has {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


@register_reader("idx")
def read_idx_dataset(spec: DatasetSpec, root: Path | None) -> ImageDataset:
    """The four IDX files in ``root``: ``train`` is the training set, ``t10k`` the test set."""
    folder = need_dir(spec, root)

    def pair(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_idx(find_file(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_file(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{folder}: {prefix} images {images.shape} and labels {labels.shape}"
            )
        x = torch.from_numpy(images.astype(np.uint8))[:, None]
        return x, torch.from_numpy(labels.astype(np.int64))

    train_x, train_y = pair("train")
    test_x, test_y = pair("t10k")
    classes = class_names_for(spec, train_y)
    return ImageDataset(spec.name, train_x, train_y, test_x, test_y, classes, flip=spec.flip)
