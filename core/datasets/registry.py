"""The readers' registry: a plain dict from a catalog ``reader`` key to the function that reads.

A reader takes the dataset's catalog entry and the folder its files are in (``None`` only for
an entry with ``needs_files=False``) and returns an :class:`~core.data.ImageDataset`. It is
kept apart from ``core/datasets/__init__.py`` so that reader modules can import it while the
package is still importing them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from catalog.datasets import DatasetSpec
from core.data import DatasetError, ImageDataset

Reader = Callable[[DatasetSpec, Path | None], ImageDataset]

READERS: dict[str, Reader] = {}


def register_reader(key: str) -> Callable[[Reader], Reader]:
    """Register the decorated function as the reader of catalog entries with ``reader=key``.

    A second reader for the same key is an error: two modules claiming one format is a bug,
    and silently keeping the later one would make the result depend on import order.
    """

    def decorate(reader: Reader) -> Reader:
        if key in READERS:
            raise ValueError(f"a dataset reader for {key!r} is already registered")
        READERS[key] = reader
        return reader

    return decorate


def need_dir(spec: DatasetSpec, root: Path | None) -> Path:
    """``root``, or the error telling the user that ``spec``'s files must be pointed at."""
    if root is None:
        raise DatasetError(f"dataset {spec.name!r} needs --data-dir: the folder holding its files")
    return root


def need_file(spec: DatasetSpec, path: Path | None) -> Path:
    """``path`` if it is a file: for an entry whose data is one file (``spec.data_file``)."""
    if path is None:
        raise DatasetError(
            f"dataset {spec.name!r} needs --data-dir: the path of its {spec.data_file} file"
        )
    if not path.is_file():
        raise DatasetError(f"data_dir {str(path)!r} for {spec.name!r} is not a file")
    return path


def class_names_for(spec: DatasetSpec, labels: torch.Tensor) -> tuple[str, ...]:
    """The entry's class names, or the label numbers "0".."K-1" for an entry without them.

    Built-in entries name their classes; the fallback lets a new catalog entry reuse a reader
    (say, another IDX dataset) before anyone has typed its class names in.
    """
    if spec.class_names is not None:
        return spec.class_names
    return tuple(str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0))
