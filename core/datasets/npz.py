"""One numpy ``.npz`` file of images and labels, read without unpickling anything.

The file holds ``x_train`` and ``x_test`` (uint8 images), ``y_train`` and ``y_test`` (integer
labels, one per image, 1-D) and optionally ``classes`` (unicode strings, ``classes[k]`` names
label ``k``; without it the classes are named "0".."K-1", K = the largest training label + 1).
It is read with ``np.load(..., allow_pickle=False)``, after each array's ``.npy`` header has
been checked: an object array (which only a pickle can rebuild) is refused naming the member,
and nothing in the file is ever executed. This is also the format the worker stores every
tenant upload in (:func:`core.datasets.tenant.write_canonical_npz`).

The catalog entry ``npz``'s ``data_dir`` is the path of the FILE, not of a folder
(``DatasetSpec.data_file``); the CLI maps ``--dataset path/to/data.npz`` to it.

Image layout, decided from the shape alone:

- (N, H, W): greyscale, one channel.
- (N, C, H, W) "NCHW" when dim 1 is 1 or 3 and the last dim is not;
- otherwise (N, H, W, C) "NHWC" when the last dim is 1 or 3;
- anything else is refused. So an ambiguous (N, 3, H, 3) is NHWC: an H x 3 image of 3
  channels.

:func:`check_dataset` holds the checks every tenant dataset passes, whatever its format: 1 or
3 channels, at least two classes, labels in [0, classes), a training image in every class and
a non-empty test set.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from catalog.datasets import DatasetSpec
from core.data import DatasetError, ImageDataset
from core.datasets.registry import need_file, register_reader

REQUIRED = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("classes",)
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


@register_reader("npz")
def read_npz_entry(spec: DatasetSpec, root: Path | None) -> ImageDataset:
    """The catalog entry's reader: ``root`` is the ``.npz`` file itself."""
    return read_npz(need_file(spec, root), flip=spec.flip)


def read_npz(path: Path, *, name: str | None = None, flip: bool = False) -> ImageDataset:
    """The dataset in the ``.npz`` at ``path``, named ``name`` (default: the file's stem).

    Raises :class:`DatasetError` naming the file (or ``name``) and the member for a missing
    array, a pickle, a wrong dtype or shape, mismatched lengths or labels out of range.
    """
    where = name or path.name
    arrays = _load_arrays(path, where)
    train_x = _images(arrays["x_train"], f"{where}: x_train")
    test_x = _images(arrays["x_test"], f"{where}: x_test")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DatasetError(
            f"{where}: x_train images are {_chw(train_x)} but x_test images are {_chw(test_x)}"
        )
    train_y = _labels(arrays["y_train"], len(train_x), f"{where}: y_train", "x_train")
    test_y = _labels(arrays["y_test"], len(test_x), f"{where}: y_test", "x_test")
    if "classes" in arrays:
        classes = _class_names(arrays["classes"], f"{where}: classes")
    else:
        k = int(train_y.max()) + 1 if train_y.size else 0
        if k > len(train_y):  # every class needs a training image: K <= N
            raise DatasetError(
                f"{where}: y_train labels reach {k - 1} with {len(train_y)} training images; "
                "every class needs training images"
            )
        classes = tuple(str(c) for c in range(k))
    data = ImageDataset(
        name=name or path.stem,
        train_x=torch.from_numpy(train_x),
        train_y=torch.from_numpy(train_y.astype(np.int64)),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y.astype(np.int64)),
        classes=classes,
        flip=flip,
    )
    return check_dataset(data, where)


def check_dataset(data: ImageDataset, where: str) -> ImageDataset:
    """``data`` itself if it is a dataset an audit can use; else :class:`DatasetError`.

    ``where`` names the source in the messages (a file name, never a server path).
    """
    if data.train_x.dtype != torch.uint8 or data.test_x.dtype != torch.uint8:
        raise DatasetError(f"{where}: images must be uint8")
    if data.channels not in (1, 3):
        raise DatasetError(f"{where}: images have {data.channels} channels; 1 or 3 are read")
    k = data.num_classes
    if k < 2:
        raise DatasetError(f"{where}: {k} class{'es' if k != 1 else ''}; an audit needs 2 or more")
    for split, labels in (("training", data.train_y), ("test", data.test_y)):
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise DatasetError(
                f"{where}: {split} labels must lie in [0, {k - 1}] for {k} classes, got "
                f"{int(labels.min())}..{int(labels.max())}"
            )
    counts = torch.bincount(data.train_y, minlength=k)
    empty = [f"{c} ({data.classes[c]!r})" for c in range(k) if counts[c] == 0]
    if empty:
        raise DatasetError(f"{where}: no training images of class {', '.join(empty[:5])}")
    if len(data.test_y) == 0:
        raise DatasetError(f"{where}: the test set is empty")
    return data


# ---- reading the arrays ---------------------------------------------------------------------


def _load_arrays(path: Path, where: str) -> dict[str, np.ndarray]:
    """The required and optional arrays, each header checked before its data is read."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except _READ_ERRORS as error:
        raise DatasetError(f"{where} is not a readable .npz file: {error}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DatasetError(
            f"{where} is a single .npy array; an .npz holds {', '.join(REQUIRED)} "
            "(np.savez(path, x_train=..., ...))"
        )
    with loaded:
        assert loaded.zip is not None  # open until the with block closes it
        missing = [key for key in REQUIRED if key not in loaded.files]
        if missing:
            raise DatasetError(
                f"{where} lacks {', '.join(missing)}; an .npz dataset holds "
                f"{', '.join(REQUIRED)} and optionally {', '.join(OPTIONAL)}"
            )
        arrays = {}
        for key in (*REQUIRED, *OPTIONAL):
            if key not in loaded.files:
                continue
            _check_header(loaded.zip, key, f"{where}: {key}")
            try:
                arrays[key] = loaded[key]  # allow_pickle=False: never unpickles
            except _READ_ERRORS as error:
                raise DatasetError(f"{where}: {key} is not a readable array: {error}") from None
    return arrays


def _check_header(archive: zipfile.ZipFile, key: str, where: str) -> None:
    """Refuse ``key``'s array before reading it: object dtypes, or more data than stored.

    An object array could only be rebuilt by unpickling; a header declaring a bigger shape
    than the member holds would make numpy allocate that much first.
    """
    member = f"{key}.npy"
    try:
        size = archive.getinfo(member).file_size
        with archive.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise DatasetError(f"{where}: .npy format {version}; versions 1.0 and 2.0 are read")
    except _READ_ERRORS as error:
        raise DatasetError(f"{where} is not a readable .npy array: {error}") from None
    if dtype.hasobject:
        raise DatasetError(
            f"{where} holds Python objects (dtype {dtype}), which only unpickling could "
            "rebuild: refused; store plain numeric or string arrays"
        )
    if math.prod(shape) * dtype.itemsize > size:
        raise DatasetError(
            f"{where} declares shape {shape} of {dtype}, more than its {size} stored bytes"
        )


def _images(array: np.ndarray, where: str) -> np.ndarray:
    """uint8 (N, C, H, W), contiguous, by the layout rule of the module docstring."""
    if array.dtype != np.uint8:
        raise DatasetError(f"{where} is {array.dtype}; images must be uint8 (0..255)")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[3] not in (1, 3):
        pass  # NCHW
    elif array.ndim == 4 and array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)  # NHWC
    else:
        raise DatasetError(
            f"{where} has shape {array.shape}; expected (N, H, W), (N, C, H, W) or "
            "(N, H, W, C) with C = 1 or 3"
        )
    if array.shape[2] == 0 or array.shape[3] == 0:
        raise DatasetError(f"{where} has shape {array.shape}: images of no pixels")
    return np.ascontiguousarray(array)


def _labels(array: np.ndarray, count: int, where: str, images: str) -> np.ndarray:
    """Integer labels, one per image, 1-D; non-negative (the range is checked with classes)."""
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(f"{where} is {array.dtype}; labels must be integers")
    if array.ndim != 1:
        raise DatasetError(f"{where} has shape {array.shape}; labels must be 1-D")
    if len(array) != count:
        raise DatasetError(f"{where} holds {len(array)} labels for {count} images in {images}")
    if array.size and array.min() < 0:
        raise DatasetError(f"{where}: labels must be >= 0, got {array.min()}")
    return array


def _class_names(array: np.ndarray, where: str) -> tuple[str, ...]:
    if array.dtype.kind != "U":
        raise DatasetError(
            f"{where} is {array.dtype}; class names must be unicode strings (dtype <U...)"
        )
    if array.ndim != 1:
        raise DatasetError(f"{where} has shape {array.shape}; class names must be 1-D")
    names = tuple(str(n) for n in array.tolist())
    if len(set(names)) != len(names):
        raise DatasetError(f"{where}: class names repeat: {sorted(names)}")
    return names


def _chw(images: np.ndarray) -> str:
    return "x".join(str(d) for d in images.shape[1:])
