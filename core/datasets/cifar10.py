"""CIFAR-10: the python pickle batches, read without letting the pickle run anything.

The files are ``data_batch_1..5``, ``test_batch`` and ``batches.meta`` in the data folder or
its ``cifar-10-batches-py`` sub-folder (as the archive unpacks). They are the dataset's own
pickles, read with a restricted unpickler that only builds dicts, lists, strings, bytes,
numbers and numpy arrays of plain (non-object) dtypes: no other object named in the file is
ever imported, so a tampered batch is refused instead of executed.

Each batch holds ``data`` (N, 3072) uint8 rows, 1024 red then 1024 green then 1024 blue values
in row-major order, and ``labels`` (N ints).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from catalog.datasets import DatasetSpec
from core.data import DatasetError, ImageDataset
from core.datasets.files import find_file
from core.datasets.registry import class_names_for, need_dir, register_reader


def _plain_dtype(*args: object) -> np.dtype:
    dtype = np.dtype(*args)  # type: ignore[call-overload]
    if dtype.hasobject:
        raise DatasetError("refusing an object dtype: a CIFAR batch holds plain data")
    return dtype


class _NdarrayToken:
    """``numpy.ndarray`` in a pickle, fresh per reference: only ``_reconstruct`` takes it."""


def _plain_reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
    if not isinstance(subtype, _NdarrayToken):
        raise DatasetError(f"refusing to build {subtype!r}: a CIFAR batch holds plain arrays")
    return np.ndarray(shape, _plain_dtype(dtype))  # type: ignore[arg-type]


def _plain_frombuffer(
    buf: bytes, dtype: object, shape: object, order: object, *_: object
) -> np.ndarray:
    return np.frombuffer(buf, dtype=_plain_dtype(dtype)).reshape(shape, order=order)  # type: ignore[call-overload]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding != "latin1" or not isinstance(text, str):
        raise DatasetError("refusing _codecs.encode outside the pickle protocol 2 bytes idiom")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    if args:
        raise DatasetError("refusing bytes(...) with arguments: a CIFAR batch holds plain data")
    return b""


# The only globals a CIFAR batch may name: what numpy (1.x writes numpy.core, 2.x numpy._core;
# protocol 5 uses _frombuffer) and protocol-2 bytes need to rebuild plain arrays and bytes. Each
# maps to a local function that refuses object dtypes, so nothing arbitrary is ever called.
_PICKLE_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): _NdarrayToken,
    ("numpy", "dtype"): _plain_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _plain_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _plain_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _plain_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _plain_frombuffer,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,  # b"" in a Python 3 protocol 0-2 pickle
    ("builtins", "bytes"): _empty_bytes,
}


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds only built-in containers, scalars and plain numpy arrays; refuses other globals."""

    def find_class(self, module: str, name: str) -> object:
        allowed = _PICKLE_GLOBALS.get((module, name))
        if allowed is None:
            raise DatasetError(f"refusing to load {module}.{name}: a CIFAR batch holds plain data")
        # Fresh objects per load: a pickle's BUILD opcode may set attributes on what it gets
        # here, and must not reach the module's own functions.
        if allowed is _NdarrayToken:
            return _NdarrayToken()
        return lambda *args: allowed(*args)  # type: ignore[operator]


def _load_cifar_batch(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            batch = _PlainDataUnpickler(handle, encoding="bytes").load()
    except DatasetError:
        raise
    except Exception as error:  # a corrupt pickle can raise almost any type
        raise DatasetError(f"{path} is not a CIFAR-10 pickle batch: {error}") from error
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} does not hold a CIFAR-10 batch dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_arrays(batch: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get("data"), batch.get("labels")
    if isinstance(data, bytes):
        data = np.frombuffer(data, dtype=np.uint8)
    data = np.asarray(data, dtype=np.uint8)
    if labels is None or data.size != len(labels) * 3072:
        raise DatasetError(f"{path}: expected 'data' of shape (N, 3072) and N 'labels'")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


@register_reader("cifar10")
def read_cifar10(spec: DatasetSpec, root: Path | None) -> ImageDataset:
    """The five training batches and the test batch; class names from ``batches.meta``.

    Without ``batches.meta`` the class names are the catalog entry's (CIFAR-10's own).
    """
    folder = need_dir(spec, root)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    paths = [find_file(folder, f"data_batch_{i}") for i in range(1, 6)]
    train = [_cifar_arrays(_load_cifar_batch(path), path) for path in paths]
    test_path = find_file(folder, "test_batch")
    test_x, test_y = _cifar_arrays(_load_cifar_batch(test_path), test_path)
    train_y = torch.from_numpy(np.concatenate([y for _, y in train]))
    classes = class_names_for(spec, train_y)
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        names = _load_cifar_batch(meta_path).get("label_names")
        if names:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return ImageDataset(
        name=spec.name,
        train_x=torch.from_numpy(np.concatenate([x for x, _ in train])),
        train_y=train_y,
        test_x=torch.from_numpy(test_x.copy()),
        test_y=torch.from_numpy(test_y),
        classes=classes,
        flip=spec.flip,
    )
