"""Image datasets read from local files, the paper's split, and on-device augmentation.

Every reader returns an :class:`ImageDataset` of uint8 tensors (N, C, H, W); nothing is
downloaded. Formats:

- ``cifar10``: the python pickle batches (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
  in ``data_dir`` or its ``cifar-10-batches-py`` sub-folder. These are the dataset's own
  pickles, read with a restricted unpickler that only builds dicts, lists, strings, bytes,
  numbers and numpy arrays of plain (non-object) dtypes: no other object named in the file is
  ever imported.
- ``tiny-imagenet``: the ``tiny-imagenet-200`` layout (``wnids.txt``, ``words.txt``,
  ``train/<wnid>/images/*.JPEG``, ``val/val_annotations.txt`` + ``val/images``); ``val`` is the
  labelled test set.
- ``fashion-mnist`` / ``mnist``: IDX files (``train-images-idx3-ubyte`` etc., optionally
  gzipped); Fashion-MNIST defaults to Debian's ``/usr/share/datasets/fashion-mnist``.
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images); the first 80% of each class
  train, the rest test.
- anything else: an image folder, ``root/train/<class>/*`` and ``root/test/<class>/*`` (or
  ``val``), read with Pillow.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.config import SplitConfig

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset that cannot be read: missing files, a bad format, or too few images."""


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image set: uint8 pixels (N, C, H, W) and int64 labels (N,)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    flip: bool  # whether a horizontal flip keeps the label (not so for digits)

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Split:
    """Indices into the training set: pre-training, clean re-training, base pool."""

    pretrain: torch.Tensor
    retrain: torch.Tensor
    pool: torch.Tensor


def default_split(dataset: str) -> SplitConfig:
    """The per-class split counts that fit ``dataset`` (the paper's for the large sets)."""
    if dataset == "digits":  # about 140 training images per class
        return SplitConfig(pretrain=100, retrain=10, pool=25)
    if dataset == "tiny-imagenet":  # 500 training images per class
        return SplitConfig(pretrain=400, retrain=25, pool=75)
    return SplitConfig()


def split_dataset(labels: torch.Tensor, counts: SplitConfig) -> Split:
    """The paper's split (Appendix A), by position within each class.

    For each class, in dataset order: the first ``counts.pretrain`` images pre-train, the
    next ``counts.retrain`` are the clean re-training set, the next ``counts.pool`` the base
    pool. Deterministic: no seed is involved.
    """
    parts: dict[str, list[torch.Tensor]] = {"pretrain": [], "retrain": [], "pool": []}
    need = counts.pretrain + counts.retrain + counts.pool
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        if len(idx) < need:
            raise DatasetError(
                f"class {cls} has {len(idx)} training images; the split needs {need} "
                f"(split.pretrain={counts.pretrain} + split.retrain={counts.retrain} "
                f"+ split.pool={counts.pool})"
            )
        a, b = counts.pretrain, counts.pretrain + counts.retrain
        parts["pretrain"].append(idx[:a])
        parts["retrain"].append(idx[a:b])
        parts["pool"].append(idx[b:need])
    return Split(**{name: torch.cat(chunks).sort().values for name, chunks in parts.items()})


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0,1], on the same device."""
    return x.float().div_(255.0)


def augment(x: torch.Tensor, *, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (4 px, or 1/8 of the side) and, if ``flip``, h-flip.

    ``x`` is a float batch (N, C, H, W) on any device; ``generator`` lives on that device, so
    the augmentation is deterministic for a seed and never leaves the device.
    """
    n, _, h, w = x.shape
    pad = max(1, min(4, h // 8))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, channels, rows, cols]
    if flip:
        mirror = torch.rand(n, device=x.device, generator=generator) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out


def load_dataset(name: str, data_dir: str | None = None) -> ImageDataset:
    """Read dataset ``name`` (see the module docstring) from ``data_dir``."""
    if name == "digits":
        return _read_digits()
    if name in ("fashion-mnist", "mnist"):
        if data_dir is None and name == "fashion-mnist":
            data_dir = FASHION_MNIST_DIR
        classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else tuple("0123456789")
        return _read_idx_dataset(name, _need_dir(name, data_dir), classes)
    if name == "cifar10":
        return _read_cifar10(_need_dir(name, data_dir))
    if name == "tiny-imagenet":
        return _read_tiny_imagenet(_need_dir(name, data_dir))
    root = Path(data_dir or name)
    if not root.is_dir():
        raise DatasetError(
            f"unknown dataset {name!r}: use one of digits, fashion-mnist, mnist, cifar10, "
            "tiny-imagenet, or the path of an image folder with train/ and test/ sub-folders"
        )
    return _read_image_folder(root)


def _need_dir(name: str, data_dir: str | None) -> Path:
    if data_dir is None:
        raise DatasetError(f"dataset {name!r} needs --data-dir: the folder holding its files")
    path = Path(data_dir)
    if not path.is_dir():
        raise DatasetError(f"data_dir {str(path)!r} for {name!r} is not a directory")
    return path


def _read_digits() -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8))
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_mask = torch.zeros(len(labels), dtype=torch.bool)
    for cls in range(10):
        idx = torch.nonzero(labels == cls).flatten()
        train_mask[idx[: int(0.8 * len(idx))]] = True
    images = images[:, None]
    return ImageDataset(
        name="digits",
        train_x=images[train_mask],
        train_y=labels[train_mask],
        test_x=images[~train_mask],
        test_y=labels[~train_mask],
        classes=tuple("0123456789"),
        flip=False,
    )


# ---- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (plain or gzipped) as a numpy array of its declared shape."""
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


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"missing {stem}[.gz] in {root}")


def _read_idx_dataset(name: str, root: Path, classes: tuple[str, ...]) -> ImageDataset:
    def pair(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{root}: {prefix} images {images.shape} and labels {labels.shape}")
        x = torch.from_numpy(images.astype(np.uint8))[:, None]
        return x, torch.from_numpy(labels.astype(np.int64))

    train_x, train_y = pair("train")
    test_x, test_y = pair("t10k")
    return ImageDataset(name, train_x, train_y, test_x, test_y, classes, flip=name != "mnist")


# ---- CIFAR-10 -------------------------------------------------------------------------------


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
    return np.frombuffer(buf, dtype=_plain_dtype(dtype)).reshape(shape, order=order)


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


def _read_cifar10(root: Path) -> ImageDataset:
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    paths = [_find(root, f"data_batch_{i}") for i in range(1, 6)]
    train = [_cifar_arrays(_load_cifar_batch(path), path) for path in paths]
    test_path = _find(root, "test_batch")
    test_x, test_y = _cifar_arrays(_load_cifar_batch(test_path), test_path)
    classes: tuple[str, ...] = (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    )  # fmt: skip
    meta_path = root / "batches.meta"
    if meta_path.is_file():
        names = _load_cifar_batch(meta_path).get("label_names")
        if names:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return ImageDataset(
        name="cifar10",
        train_x=torch.from_numpy(np.concatenate([x for x, _ in train])),
        train_y=torch.from_numpy(np.concatenate([y for _, y in train])),
        test_x=torch.from_numpy(test_x.copy()),
        test_y=torch.from_numpy(test_y),
        classes=classes,
        flip=True,
    )


# ---- image files ----------------------------------------------------------------------------


def _read_image(path: Path, mode: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert(mode), dtype=np.uint8)
    except OSError as error:  # missing, truncated or not an image (PIL's errors are OSErrors)
        raise DatasetError(f"cannot read image {path}: {error}") from error
    return array[:, :, None] if array.ndim == 2 else array


def _stack(paths: list[Path], mode: str, where: Path) -> torch.Tensor:
    arrays = [_read_image(p, mode) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DatasetError(f"images under {where} differ in size: {sorted(shapes)[:3]}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _image_mode(sample: Path) -> str:
    from PIL import Image

    with Image.open(sample) as image:
        return "L" if image.mode in ("L", "1", "I", "I;16") else "RGB"


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"missing image folder {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _read_image_folder(root: Path) -> ImageDataset:
    test_root = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_root is None:
        raise DatasetError(f"image folder {root} needs train/<class>/ and test/<class>/ (or val/)")
    classes = tuple(sorted(d.name for d in (root / "train").iterdir() if d.is_dir()))
    if len(classes) < 2:
        raise DatasetError(f"{root / 'train'} needs at least two class sub-folders")
    first = next((p for c in classes for p in _images_in(root / "train" / c)), None)
    if first is None:
        raise DatasetError(f"no images under {root / 'train'}")
    mode = _image_mode(first)

    def read(split_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        paths, labels = [], []
        for index, cls in enumerate(classes):
            found = _images_in(split_root / cls) if (split_root / cls).is_dir() else []
            paths += found
            labels += [index] * len(found)
        if not paths:
            raise DatasetError(f"no images under {split_root}")
        return _stack(paths, mode, split_root), torch.tensor(labels, dtype=torch.int64)

    train_x, train_y = read(root / "train")
    test_x, test_y = read(test_root)
    return ImageDataset(root.name, train_x, train_y, test_x, test_y, classes, flip=True)


def _read_tiny_imagenet(root: Path) -> ImageDataset:
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise DatasetError(f"{root} is not a Tiny ImageNet folder: wnids.txt is missing")
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    index = {wnid: i for i, wnid in enumerate(wnids)}
    names = dict(wnids=wnids)
    words = root / "words.txt"
    if words.is_file():
        lookup = dict(
            line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line
        )
        names["wnids"] = [lookup.get(w, w).split(",")[0].strip() for w in wnids]

    train_paths, train_labels = [], []
    for wnid in wnids:
        found = _images_in(root / "train" / wnid / "images")
        train_paths += found
        train_labels += [index[wnid]] * len(found)
    annotations = root / "val" / "val_annotations.txt"
    if not train_paths or not annotations.is_file():
        raise DatasetError(f"{root} needs train/<wnid>/images/ and val/val_annotations.txt")
    test_paths, test_labels = [], []
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[1] in index:
            test_paths.append(root / "val" / "images" / fields[0])
            test_labels.append(index[fields[1]])
    return ImageDataset(
        name="tiny-imagenet",
        train_x=_stack(train_paths, "RGB", root / "train"),
        train_y=torch.tensor(train_labels, dtype=torch.int64),
        test_x=_stack(test_paths, "RGB", root / "val"),
        test_y=torch.tensor(test_labels, dtype=torch.int64),
        classes=tuple(names["wnids"]),
        flip=True,
    )


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images in [0,1] units (std floored at 1e-3)."""
    pixels = to_float(x).transpose(0, 1).reshape(x.shape[1], -1)
    return pixels.mean(1).tolist(), pixels.std(1).clamp_min(1e-3).tolist()


def encode_png(image: torch.Tensor) -> bytes:
    """A (C, H, W) uint8 tensor as PNG bytes (used by tests and the poison grid)."""
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, "PNG")
    return buffer.getvalue()
