"""Dataset readers, one module per file format, registered against the catalog's reader keys.

``load_dataset(name, data_dir)`` looks ``name`` up in :data:`catalog.DATASETS`, finds the
folder (``data_dir``, else the entry's ``default_dir``) and calls the reader registered for
the entry's ``reader`` key. Nothing is downloaded. Adding a dataset is a catalog entry; adding
a format is also one module here with an ``@register_reader("key")`` function, imported below
so that it registers.

Readers: ``digits`` (scikit-learn's bundled set), ``idx`` (MNIST, Fashion-MNIST), ``cifar10``
(the python pickle batches, read with a restricted unpickler), ``tiny-imagenet`` (its folder
layout), ``image-folder`` (``train/<class>/``, ``test/<class>/``) and ``npz`` (one ``.npz``
file, read with ``allow_pickle=False``; its ``data_dir`` is the file's path). Tenant uploads
(an ``.npz``, or archives extracted safely) are read by :mod:`core.datasets.tenant`.
"""

from __future__ import annotations

from pathlib import Path

from catalog.datasets import DATASETS, DatasetSpec
from catalog.registry import UnknownNameError
from core.data import DatasetError, ImageDataset

# Imported for their registrations.
from core.datasets import cifar10, digits, idx, image_folder, npz, tiny_imagenet  # noqa: F401
from core.datasets.registry import READERS, Reader, need_dir, need_file, register_reader

__all__ = ["READERS", "Reader", "load_dataset", "register_reader"]


def load_dataset(name: str, data_dir: str | None = None) -> ImageDataset:
    """Read the catalog's dataset ``name`` from ``data_dir`` (else its default folder).

    An unknown name, a dataset without a folder, or unreadable files raise
    :class:`DatasetError` with a message the user can act on.
    """
    try:
        spec = DATASETS.get(name)
    except UnknownNameError as error:
        raise DatasetError(str(error)) from None
    reader = READERS.get(spec.reader)
    if reader is None:  # a catalog entry whose module was never written or imported: a bug
        raise RuntimeError(
            f"dataset {name!r} uses reader {spec.reader!r}, which core.datasets lacks; "
            f"readers: {', '.join(READERS)}"
        )
    return reader(spec, _resolve_dir(spec, data_dir))


def _resolve_dir(spec: DatasetSpec, data_dir: str | None) -> Path | None:
    """The folder to read: ``data_dir``, else the entry's default; checked if files are needed.

    An entry that needs no files (bundled with a package) gets ``None`` or the given folder
    unchecked, so a stray ``--data-dir`` is ignored for it as before. For an entry whose data
    is one file (``spec.data_file``), ``data_dir`` is that file's path and must be a file.
    """
    folder = data_dir if data_dir is not None else spec.default_dir
    if not spec.needs_files:
        return None if folder is None else Path(folder)
    if spec.data_file is not None:
        return need_file(spec, None if folder is None else Path(folder))
    path = need_dir(spec, None if folder is None else Path(folder))
    if not path.is_dir():
        raise DatasetError(f"data_dir {str(path)!r} for {spec.name!r} is not a directory")
    return path
