"""The file formats a tenant may upload a dataset in (``POST /v1/datasets``).

Each entry says how the upload is recognised from its file name, and, for an ``npz``, which
arrays it must hold: the API checks the container against this without reading an array, and
the worker's reader (``core.datasets.tenant``) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from catalog.registry import Catalog, OneOf


@dataclass(frozen=True)
class DatasetFormatSpec:
    name: str
    title: str
    suffixes: tuple[str, ...]  # file name endings that mean this format (lower case)
    filenames: tuple[str, ...] = ()  # whole file names that mean it, before any suffix rule
    # The members a zip of this format must hold and may hold besides; None: any member names.
    members: tuple[str, ...] | None = None
    optional_members: tuple[str, ...] = ()


NPZ_MEMBERS = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")

DATASET_FORMATS: Catalog[DatasetFormatSpec] = Catalog(
    "dataset format",
    [
        DatasetFormatSpec(
            name="npz",
            title="numpy .npz: uint8 x_train, x_test; integer y_train, y_test; optional classes",
            suffixes=(".npz",),
            members=NPZ_MEMBERS,
            optional_members=("classes.npy",),
        ),
        DatasetFormatSpec(
            name="image-folder",
            title="a .zip or .tar(.gz) of train/<class>/ and test/<class>/ image files",
            suffixes=(".zip", ".tar", ".tar.gz", ".tgz"),
        ),
        DatasetFormatSpec(
            name="cifar10",
            title="CIFAR-10's python batches as distributed (cifar-10-python.tar.gz)",
            suffixes=(),
            filenames=("cifar-10-python.tar.gz",),
        ),
    ],
)

DatasetFormatName = Annotated[str, OneOf(DATASET_FORMATS)]


def infer_format(filename: str | None) -> str | None:
    """The format a file name means (a whole-name match first, then the longest suffix), or
    None when it means none."""
    if not filename:
        return None
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].lower()
    for spec in DATASET_FORMATS.entries():
        if name in spec.filenames:
            return spec.name
    matches = [
        (len(suffix), spec.name)
        for spec in DATASET_FORMATS.entries()
        for suffix in spec.suffixes
        if name.endswith(suffix)
    ]
    return max(matches)[1] if matches else None
