"""Datasets: what each built-in dataset is, and the paper's split of a training set.

A torch reader registers against each entry's ``reader`` key in ``core.datasets`` (one module
per reader); the entry says everything the service and the CLI need without reading a file.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from catalog.registry import Catalog


class SplitConfig(BaseModel):
    """Per-class counts of the paper's split of the training set (Appendix A).

    In class order, the first ``pretrain`` images of each class pre-train; of the rest, the
    next ``retrain`` form the clean re-training set and the next ``pool`` the base-image pool.
    ``pretrain`` may be 0: an audit of a model trained elsewhere needs only re-training
    images, a base pool and test targets (pre-training refuses such a split).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pretrain: int = Field(
        4800, ge=0, le=10_000_000, description="pre-training images per class (0: audit only)"
    )
    retrain: int = Field(50, ge=1, le=10_000_000, description="clean re-training images per class")
    pool: int = Field(150, ge=1, le=10_000_000, description="base-pool images per class")


PAPER_SPLIT = SplitConfig()
# Tenant datasets vary in size and audit models trained elsewhere: no pre-training images, and
# small re-training and pool counts that most datasets have. An audit request's
# ``overrides.split`` (the CLI's ``--split``) sets other counts.
TENANT_SPLIT = SplitConfig(pretrain=0, retrain=10, pool=25)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset. ``None`` for a fact means "read from the files" (an image folder)."""

    name: str
    title: str
    reader: str  # key of the torch reader in core.datasets
    num_classes: int | None
    channels: int | None
    size: tuple[int, int] | None  # (height, width)
    default_split: SplitConfig = PAPER_SPLIT
    class_names: tuple[str, ...] | None = None  # None: read from the files
    default_dir: str | None = None  # where the files are when no data_dir is given
    needs_files: bool = True  # False: bundled with a Python package
    flip: bool = True  # whether a horizontal flip keeps the label (augmentation)
    # The dataset is one file with this suffix (".npz"): its data_dir is that file's path,
    # not a folder. None: data_dir is a folder.
    data_file: str | None = None


FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DIGIT_NAMES = tuple("0123456789")

DATASETS: Catalog[DatasetSpec] = Catalog(
    "dataset",
    [
        DatasetSpec(
            name="digits",
            title="scikit-learn's bundled 8x8 digits (1797 images)",
            reader="digits",
            num_classes=10,
            channels=1,
            size=(8, 8),
            default_split=SplitConfig(pretrain=100, retrain=10, pool=25),
            class_names=DIGIT_NAMES,
            needs_files=False,
            flip=False,
        ),
        DatasetSpec(
            name="fashion-mnist",
            title="Fashion-MNIST, IDX files",
            reader="idx",
            num_classes=10,
            channels=1,
            size=(28, 28),
            class_names=FASHION_MNIST_CLASSES,
            default_dir="/usr/share/datasets/fashion-mnist",
        ),
        DatasetSpec(
            name="mnist",
            title="MNIST, IDX files",
            reader="idx",
            num_classes=10,
            channels=1,
            size=(28, 28),
            class_names=DIGIT_NAMES,
            flip=False,
        ),
        DatasetSpec(
            name="cifar10",
            title="CIFAR-10, the python pickle batches",
            reader="cifar10",
            num_classes=10,
            channels=3,
            size=(32, 32),
            class_names=CIFAR10_CLASSES,
        ),
        DatasetSpec(
            name="tiny-imagenet",
            title="Tiny ImageNet, its tiny-imagenet-200 folder",
            reader="tiny-imagenet",
            num_classes=200,
            channels=3,
            size=(64, 64),
            default_split=SplitConfig(pretrain=400, retrain=25, pool=75),
        ),
        DatasetSpec(
            name="image-folder",
            title="an image folder with train/<class>/ and test/<class>/",
            reader="image-folder",
            num_classes=None,
            channels=None,
            size=None,
        ),
        # A tenant's dataset (the worker stores every upload as such a file) or a local one.
        # No flip: whether a mirror image keeps its label is unknown for arbitrary data.
        DatasetSpec(
            name="npz",
            title="a numpy .npz: uint8 x_train, x_test; integer y_train, y_test; opt. classes",
            reader="npz",
            num_classes=None,
            channels=None,
            size=None,
            default_split=TENANT_SPLIT,
            flip=False,
            data_file=".npz",
        ),
    ],
)
