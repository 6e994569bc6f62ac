"""A tenant's uploaded dataset: read safely, checked, described, and stored as one ``.npz``.

The worker calls three functions on an upload (an untrusted file) of one of the formats of
``catalog.DATASET_FORMATS``:

1. :func:`read_tenant_dataset` reads it: an ``.npz`` (``core.datasets.npz``, with
   ``allow_pickle=False``, after the container passed :func:`core.archives.inspect_archive`:
   an ``.npz`` is a zip), or a ``.zip`` / ``.tar[.gz|.bz2|.xz]`` extracted by
   :func:`core.archives.extract_archive` into ``work_dir`` and read with the ``image-folder``
   reader (``train/<class>/``, ``test/<class>/``) or the restricted CIFAR-10 batch reader.
   The archive may hold the data at its root or inside one folder (``pets/train/...``,
   ``cifar-10-batches-py/...``). Every result passes :func:`core.datasets.npz.check_dataset`:
   1 or 3 channels, two classes or more, labels in range, training images in every class, a
   non-empty test set.
2. :func:`dataset_facts` describes it (classes, image size, per-class counts) for the
   dataset's row.
3. :func:`write_canonical_npz` writes it as the ``.npz`` the catalog entry ``npz`` reads back
   identically; audits of the tenant dataset read that file.

Every refusal is a :class:`DatasetError` whose message names the problem and the member, and
never a server path (the extraction folder is named after the upload).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from catalog.datasets import DATASETS
from core.archives import ArchiveError, ArchiveLimits, extract_archive, inspect_archive
from core.data import DatasetError, ImageDataset
from core.datasets.cifar10 import read_cifar10
from core.datasets.image_folder import read_image_folder
from core.datasets.npz import check_dataset, read_npz

TenantFormat = Literal["npz", "image-folder", "cifar10"]
_ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip", ".npz")
_IGNORED_FOLDERS = ("__MACOSX",)  # what macOS's zip adds beside the data


def read_tenant_dataset(
    upload: Path,
    format: TenantFormat,
    *,
    work_dir: Path,
    limits: ArchiveLimits,
    name: str | None = None,
) -> ImageDataset:
    """The dataset in the uploaded file ``upload``, read as ``format`` and checked.

    Args:
        upload: the uploaded file (untrusted).
        format: ``npz``, ``image-folder`` (a zip or tar of ``train/<class>/`` and
            ``test/<class>/`` images) or ``cifar10`` (a zip or tar of CIFAR-10's python
            batches, e.g. ``cifar-10-python.tar.gz``).
        work_dir: where an archive is extracted (created if missing); the extracted files are
            removed before returning, whatever happens.
        limits: what the archive (or the ``.npz``, a zip) may hold.
        name: the upload's own file name as the tenant gave it (default: ``upload``'s);
            without its archive suffix it names the dataset and the upload in messages.

    Raises :class:`DatasetError` for a refused archive or invalid data.
    """
    label = _stem(name or upload.name)
    if format == "npz":
        try:
            inspect_archive(upload, limits)
        except ArchiveError as error:
            raise DatasetError(f"{label}: {error}") from None
        return read_npz(upload, name=label, flip=DATASETS.get("npz").flip)
    if format == "image-folder":
        return _read_archive(upload, label, work_dir, limits, "image-folder", _has_train_folder)
    if format == "cifar10":
        return _read_archive(upload, label, work_dir, limits, "cifar10", _has_cifar_batches)
    raise DatasetError(f"unknown dataset format {format!r}; formats: npz, image-folder, cifar10")


def dataset_facts(data: ImageDataset) -> dict[str, Any]:
    """What a dataset's row records: class names, image size, per-class image counts.

    ``train_per_class[k]`` and ``test_per_class[k]`` count the images of ``classes[k]``.
    """
    k = data.num_classes
    height, width = data.input_size
    return {
        "name": data.name,
        "classes": list(data.classes),
        "num_classes": k,
        "channels": data.channels,
        "height": height,
        "width": width,
        "train_images": len(data.train_y),
        "test_images": len(data.test_y),
        "train_per_class": torch.bincount(data.train_y, minlength=k).tolist(),
        "test_per_class": torch.bincount(data.test_y, minlength=k).tolist(),
    }


def write_canonical_npz(data: ImageDataset, path: Path) -> None:
    """Write ``data`` to ``path`` (exactly that name) as the ``npz`` reader's format.

    uint8 NCHW ``x_train`` / ``x_test``, int64 ``y_train`` / ``y_test`` and the unicode
    ``classes``; stored uncompressed (pixels barely compress, and audits read it often).
    ``core.datasets.npz.read_npz`` reads back the same tensors and class names.
    """
    with Path(path).open("wb") as handle:  # a file object: np.savez adds no ".npz" suffix
        np.savez(
            handle,
            x_train=data.train_x.contiguous().numpy(),
            y_train=data.train_y.to(torch.int64).numpy(),
            x_test=data.test_x.contiguous().numpy(),
            y_test=data.test_y.to(torch.int64).numpy(),
            classes=np.array(data.classes, dtype=np.str_),
        )


# ---- archives -------------------------------------------------------------------------------


def _read_archive(
    upload: Path,
    label: str,
    work_dir: Path,
    limits: ArchiveLimits,
    entry: str,
    holds_data: Callable[[Path], bool],
) -> ImageDataset:
    """Extract ``upload`` under ``work_dir``, read it with ``entry``'s reader, clean up."""
    spec = DATASETS.get(entry)
    reader = read_image_folder if entry == "image-folder" else read_cifar10
    work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dataset-", dir=work_dir))
    root = scratch / "data"
    try:
        try:
            extract_archive(upload, root, limits)
        except ArchiveError as error:
            raise DatasetError(f"{label}: {error}") from None
        try:
            data = reader(spec, _data_root(root, holds_data))
        except DatasetError as error:  # name the upload, not the extraction folder
            raise DatasetError(str(error).replace(str(root), label)) from None
        return check_dataset(dataclasses.replace(data, name=label), label)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _data_root(root: Path, holds_data: Callable[[Path], bool]) -> Path:
    """``root``, or the folder inside it that holds the data when all else is one folder."""
    folder = root
    for _ in range(3):
        if holds_data(folder):
            return folder
        inner = [
            p
            for p in folder.iterdir()
            if p.is_dir() and p.name not in _IGNORED_FOLDERS and not p.name.startswith(".")
        ]
        others = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        if len(inner) != 1 or others:
            break
        folder = inner[0]
    return root  # the reader says what is missing


def _has_train_folder(folder: Path) -> bool:
    return (folder / "train").is_dir()


def _has_cifar_batches(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("data_batch_1", "data_batch_1.gz"))


def _stem(filename: str) -> str:
    """``pets.tar.gz`` -> ``pets``: the file name without its archive suffix."""
    lower = filename.lower()
    for suffix in _ARCHIVE_SUFFIXES:
        if lower.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return filename or "dataset"
