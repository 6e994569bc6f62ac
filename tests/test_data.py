"""core.data and core.datasets: every reader on files in its format, the split, augmentation.

Each reader test writes a tiny dataset in the real on-disk format into ``tmp_path`` and checks
pixels, labels and class names against what was written.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catalog.datasets import DATASETS, FASHION_MNIST_CLASSES, DatasetSpec, SplitConfig
from core.data import (
    DatasetError,
    ImageDataset,
    augment,
    channel_stats,
    encode_png,
    split_dataset,
    to_float,
)
from core.datasets import READERS, load_dataset, register_reader
from core.datasets.idx import read_idx
from core.errors import BulwarkError, ErrorKind

FASHION_MNIST_DIR = str(DATASETS.get("fashion-mnist").default_dir)

# ---- CIFAR-10 -------------------------------------------------------------------------------

CIFAR_NAMES = b"plane car bird cat deer dog frog horse ship truck".split()


class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 ``str`` opcodes (SHORT_BINSTRING / BINSTRING), like cPickle did.

    The real CIFAR-10 batches were written by Python 2 with numpy 1.x: protocol 2, ``str``
    keys and pixel bytes, and ``numpy.core.multiarray._reconstruct`` for the arrays.
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def _python2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _write_pickle(path: Path, obj: object, protocol: int | str) -> None:
    if protocol == "py2":
        path.write_bytes(_python2_pickle(obj))
    else:
        with path.open("wb") as handle:
            pickle.dump(obj, handle, protocol=int(protocol))


def _write_cifar(
    root: Path, per_batch: int = 4, test_size: int = 6, protocol: int | str = 4
) -> dict[str, np.ndarray]:
    """Five training batches, a test batch and batches.meta, as the real dataset lays them out."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    train_data, train_labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        }
        _write_pickle(root / f"data_batch_{i}", batch, protocol)
        train_data.append(data)
        train_labels += labels
    test_data = rng.integers(0, 256, (test_size, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in rng.integers(0, 10, test_size)]
    _write_pickle(
        root / "test_batch",
        {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test_data},
        protocol,
    )
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": CIFAR_NAMES,
        b"num_vis": 3072,
        b"note": b"",  # Python 3 pickles b"" as bytes() below protocol 3
    }
    _write_pickle(root / "batches.meta", meta, protocol)
    return {
        "train_x": np.concatenate(train_data),
        "train_y": np.array(train_labels),
        "test_x": test_data,
        "test_y": np.array(test_labels),
    }


@pytest.mark.parametrize("protocol", ["py2", 2, 3, 4, 5])
def test_cifar10_reads_pickle_batches_of_every_protocol(
    tmp_path: Path, protocol: int | str
) -> None:
    written = _write_cifar(tmp_path, protocol=protocol)
    if protocol == "py2":  # as written by Python 2 and numpy 1.x: no Python 3 bytes idiom
        raw = (tmp_path / "data_batch_1").read_bytes()
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    ds = load_dataset("cifar10", str(tmp_path))

    assert ds.name == "cifar10"
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (6, 3, 32, 32)
    assert ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == written["train_y"].tolist()
    assert ds.test_y.tolist() == written["test_y"].tolist()
    assert np.array_equal(ds.train_x.reshape(20, 3072).numpy(), written["train_x"])
    assert np.array_equal(ds.test_x.reshape(6, 3072).numpy(), written["test_x"])
    assert ds.classes == tuple(n.decode() for n in CIFAR_NAMES)
    assert ds.flip is True and ds.channels == 3 and ds.input_size == (32, 32)


def test_cifar10_row_layout_is_1024_red_then_green_then_blue_row_major(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path)
    ds = load_dataset("cifar10", str(tmp_path))
    row = written["train_x"][7]
    for c, h, w in [(0, 0, 0), (0, 0, 31), (1, 5, 3), (2, 31, 31), (2, 17, 0)]:
        assert int(ds.train_x[7, c, h, w]) == int(row[c * 1024 + h * 32 + w])


def test_cifar10_reads_the_cifar_10_batches_py_sub_folder(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.train_y.tolist() == written["train_y"].tolist()
    assert np.array_equal(ds.test_x.reshape(-1, 3072).numpy(), written["test_x"])


def test_cifar10_without_meta_uses_the_standard_class_names(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "batches.meta").unlink()
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck" and ds.num_classes == 10


def test_cifar10_missing_batch_raises_dataset_error_naming_it(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar10_needs_a_data_dir_that_exists(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data-dir"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset("cifar10", str(tmp_path / "absent"))


class _TouchOnUnpickle:
    """A pickle payload: unpickling it runs ``touch <path>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


def test_malicious_payload_is_live_under_plain_pickle(tmp_path: Path) -> None:
    """Control for the next test: the payload really creates its file when unpickled."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps({b"data": _TouchOnUnpickle(marker)}))
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_cifar_batch_is_refused_and_runs_nothing(tmp_path: Path, protocol: int) -> None:
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": _TouchOnUnpickle(marker), b"labels": [0]}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(evil, protocol=protocol))

    with pytest.raises(DatasetError, match="refusing"):
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "name",
    [b"numpy\ndtype", b"numpy\nndarray", b"_codecs\nencode"],
    ids=["dtype", "ndarray", "codecs-encode"],
)
def test_cifar_pickle_cannot_set_attributes_on_the_readers_own_objects(
    tmp_path: Path, name: bytes
) -> None:
    import core.datasets.cifar10

    allowed = list(core.datasets.cifar10._PICKLE_GLOBALS.values())
    names = [obj.__name__ for obj in allowed]  # type: ignore[attr-defined]
    _write_cifar(tmp_path)
    # GLOBAL <name>; BUILD {"__name__": "pwn", "marker": 1} onto it (setattr on the global).
    state = b"}(X\x08\x00\x00\x00__name__X\x03\x00\x00\x00pwnX\x06\x00\x00\x00markerK\x01u"
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x02c" + name + b"\n" + state + b"b.")
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_dataset("cifar10", str(tmp_path))
    assert [obj.__name__ for obj in allowed] == names  # type: ignore[attr-defined]
    assert not any(hasattr(obj, "marker") for obj in allowed)


def test_cifar_batch_with_object_array_is_refused(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    evil = {b"data": np.array([1, "x"], dtype=object), b"labels": [0]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(evil, protocol=4))
    with pytest.raises(DatasetError, match="object dtype"):
        load_dataset("cifar10", str(tmp_path))


@pytest.mark.parametrize(
    "content",
    [b"", b"not a pickle at all", pickle.dumps([1, 2, 3]), pickle.dumps({b"data": b"\x00" * 10})],
    ids=["empty", "garbage", "list", "short-data"],
)
def test_corrupt_cifar_batch_raises_dataset_error(tmp_path: Path, content: bytes) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(content)
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_dataset("cifar10", str(tmp_path))


# ---- Tiny ImageNet --------------------------------------------------------------------------


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _write_tiny_imagenet(root: Path, size: int = 16) -> dict[str, object]:
    """Two wnids, three JPEG training images each (one greyscale), three val images.

    One val image holds PNG-encoded content under its .JPEG name (Pillow reads by content), so
    its pixels can be compared exactly.
    """
    rng = np.random.default_rng(1)
    wnids = ["n01443537", "n02099601"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text(
        "n00000001\tentity\nn01443537\tgoldfish, Carassius auratus\nn02099601\tgolden retriever\n"
    )
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for j in range(3):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if j == 2:
                image = image.convert("L")  # the real set has a few greyscale JPEGs
            image.save(folder / f"{wnid}_{j}.JPEG", "JPEG")
    (root / "val" / "images").mkdir(parents=True)
    exact = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    (root / "val" / "images" / "val_0.JPEG").write_bytes(_png_bytes(exact))
    for j in (1, 2):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val" / "images" / f"val_{j}.JPEG", "JPEG")
    (root / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02099601\t0\t0\t10\t10\n"
        "val_1.JPEG\tn01443537\t1\t2\t12\t14\n"
        "val_2.JPEG\tn02099601\t3\t3\t9\t9\n"
    )
    return {"exact_val_0": exact}


def test_tiny_imagenet_reads_its_folder_layout(tmp_path: Path) -> None:
    written = _write_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    ds = load_dataset("tiny-imagenet", str(tmp_path))  # the parent folder: sub-folder found

    assert ds.name == "tiny-imagenet"
    assert ds.train_x.shape == (6, 3, 16, 16) and ds.train_x.dtype == torch.uint8
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.test_x.shape == (3, 3, 16, 16)
    assert ds.test_y.tolist() == [1, 0, 1]  # val_annotations order, labels by wnids.txt order
    assert ds.classes == ("goldfish", "golden retriever")
    assert np.array_equal(ds.test_x[0].permute(1, 2, 0).numpy(), written["exact_val_0"])
    grey = ds.train_x[2]  # the greyscale JPEG, converted to three equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_tiny_imagenet_without_words_uses_wnids_as_class_names(tmp_path: Path) -> None:
    _write_tiny_imagenet(tmp_path)
    (tmp_path / "words.txt").unlink()
    ds = load_dataset("tiny-imagenet", str(tmp_path))
    assert ds.classes == ("n01443537", "n02099601")


def test_tiny_imagenet_without_wnids_raises_dataset_error(tmp_path: Path) -> None:
    _write_tiny_imagenet(tmp_path)
    (tmp_path / "wnids.txt").unlink()
    with pytest.raises(DatasetError, match=r"wnids\.txt"):
        load_dataset("tiny-imagenet", str(tmp_path))


def test_tiny_imagenet_missing_wnid_folder_raises_dataset_error(tmp_path: Path) -> None:
    _write_tiny_imagenet(tmp_path)
    (tmp_path / "wnids.txt").write_text("n01443537\nn02099601\nn09999999\n")
    with pytest.raises(DatasetError, match="n09999999"):
        load_dataset("tiny-imagenet", str(tmp_path))


def test_tiny_imagenet_missing_val_image_raises_dataset_error(tmp_path: Path) -> None:
    _write_tiny_imagenet(tmp_path)
    (tmp_path / "val" / "images" / "val_1.JPEG").unlink()
    with pytest.raises(DatasetError, match=r"val_1\.JPEG"):
        load_dataset("tiny-imagenet", str(tmp_path))


# ---- image folder ---------------------------------------------------------------------------


def _write_image_folder(
    root: Path, mode: str, test_name: str = "test", size: tuple[int, int] = (5, 7)
) -> dict[str, list[np.ndarray]]:
    """train/<class>/*.png and <test_name>/<class>/*.png; returns the arrays in reading order."""
    rng = np.random.default_rng(2)
    shape = size if mode == "L" else (*size, 3)
    written: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    counts = {"train": {"cat": 3, "dog": 2}, test_name: {"cat": 1, "dog": 2}}
    for split, per_class in counts.items():
        for cls, count in per_class.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for j in range(count):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(folder / f"{j:03d}.png")
                written["train" if split == "train" else "test"].append(pixels)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored by suffix
    return written


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_image_folder_round_trips_pixels_exactly(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "pets"
    written = _write_image_folder(root, mode)
    ds = load_dataset("image-folder", str(root))

    channels = 1 if mode == "L" else 3
    assert ds.name == "pets" and ds.classes == ("cat", "dog")
    assert ds.train_x.shape == (5, channels, 5, 7) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (3, channels, 5, 7)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1]
    assert ds.test_y.tolist() == [0, 1, 1]
    for tensor, arrays in ((ds.train_x, written["train"]), (ds.test_x, written["test"])):
        for image, pixels in zip(tensor, arrays, strict=True):
            expected = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
            assert np.array_equal(image.numpy(), expected)


def test_image_folder_accepts_val_and_data_dir(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _write_image_folder(root, "RGB", test_name="val")
    ds = load_dataset("image-folder", str(root))
    assert ds.test_x.shape == (3, 3, 5, 7) and ds.flip is True


def test_image_folder_with_mixed_sizes_raises_dataset_error(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _write_image_folder(root, "RGB")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "train" / "dog" / "big.png")
    with pytest.raises(DatasetError, match="differ in size"):
        load_dataset("image-folder", str(root))


def test_image_folder_with_a_corrupt_image_raises_dataset_error(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _write_image_folder(root, "RGB")
    (root / "test" / "dog" / "999.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DatasetError, match=r"999\.png"):
        load_dataset("image-folder", str(root))


def test_image_folder_whose_first_image_is_corrupt_raises_dataset_error(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _write_image_folder(root, "RGB")
    (root / "train" / "cat" / "000.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DatasetError, match=r"000\.png"):
        load_dataset("image-folder", str(root))


def test_image_folder_skips_hidden_files_and_refuses_decompression_bombs(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _write_image_folder(root, "RGB")
    (root / "train" / "cat" / "._000.png").write_bytes(b"a macOS resource fork")
    assert load_dataset("image-folder", str(root)).train_x.shape[0] == 5
    # A 1 x 1 PNG whose header claims far more pixels than Pillow's limit allows.
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(root / "test" / "dog" / "000.png")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 0  # every image is then "too large" by a factor of 2
        with pytest.raises(DatasetError, match="decompression bomb"):
            load_dataset("image-folder", str(root))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_image_folder_without_test_split_raises_dataset_error(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _write_image_folder(root, "RGB")
    (root / "test").rename(root / "holdout")
    with pytest.raises(DatasetError, match=r"needs train/<class>/ and test/<class>/"):
        load_dataset("image-folder", str(root))


def test_image_folder_needs_a_data_dir() -> None:
    with pytest.raises(DatasetError, match="'image-folder' needs --data-dir"):
        load_dataset("image-folder")


def test_unknown_dataset_name_raises_dataset_error_listing_the_names(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="digits, fashion-mnist, mnist, cifar10"):
        load_dataset("no-such-dataset")
    # A folder's path is not a dataset name: mapping a path to image-folder is the CLI's job.
    _write_image_folder(tmp_path / "pets", "RGB")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset(str(tmp_path / "pets"))


def test_encode_png_round_trips_grey_and_rgb() -> None:
    gen = torch.Generator().manual_seed(3)
    for channels in (1, 3):
        image = torch.randint(0, 256, (channels, 4, 6), dtype=torch.uint8, generator=gen)
        decoded = np.asarray(Image.open(io.BytesIO(encode_png(image))))
        decoded = decoded[None] if decoded.ndim == 2 else decoded.transpose(2, 0, 1)
        assert np.array_equal(decoded, image.numpy())


# ---- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: 0, 0, type code, ndim; big-endian uint32 dims; big-endian data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i2"): 0x0B, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_idx_set(root: Path, gz: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = _idx_bytes(array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)
    return arrays


def test_idx_header_has_the_documented_magic_numbers() -> None:
    assert _idx_bytes(np.zeros((2, 3, 4), np.uint8))[:4] == struct.pack(">I", 0x00000803)
    assert _idx_bytes(np.zeros(2, np.uint8))[:4] == struct.pack(">I", 0x00000801)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_dataset_reads_plain_and_gzipped_files(tmp_path: Path, gz: bool, name: str) -> None:
    written = _write_idx_set(tmp_path, gz)
    ds = load_dataset(name, str(tmp_path))

    assert ds.train_x.shape == (12, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (5, 1, 28, 28)
    assert np.array_equal(ds.train_x[:, 0].numpy(), written["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test_x[:, 0].numpy(), written["t10k-images-idx3-ubyte"])
    assert ds.train_y.tolist() == written["train-labels-idx1-ubyte"].tolist()
    assert ds.test_y.tolist() == written["t10k-labels-idx1-ubyte"].tolist()
    assert ds.train_y.dtype == torch.int64
    if name == "mnist":
        assert ds.classes == tuple("0123456789") and ds.flip is False
    else:
        assert ds.classes == FASHION_MNIST_CLASSES and ds.flip is True


@pytest.mark.parametrize(("dtype", "offset"), [("u1", 0), (">i2", -1000), (">f4", 0.5)])
def test_read_idx_keeps_dtype_shape_and_big_endian_values(
    tmp_path: Path, dtype: str, offset: float
) -> None:
    array = (np.arange(24).reshape(2, 3, 4) * 11 + offset).astype(dtype)
    path = tmp_path / "x.idx"
    path.write_bytes(_idx_bytes(array))
    read = read_idx(path)
    assert read.shape == (2, 3, 4) and read.dtype == np.dtype(dtype)
    assert np.array_equal(read, array)


def test_read_idx_bad_magic_raises_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    raw = bytearray(_idx_bytes(np.zeros((2, 2), np.uint8)))
    raw[0] = 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="bad magic number"):
        read_idx(path)
    raw[0], raw[2] = 0, 0x07  # unknown type code
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="bad magic number"):
        read_idx(path)


def test_read_idx_truncated_files_raise_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))  # declares 3 dims, holds half of one
    with pytest.raises(DatasetError, match="declares 3 dimensions but is truncated"):
        read_idx(path)
    path.write_bytes(_idx_bytes(np.zeros((4, 4), np.uint8))[:-3])
    with pytest.raises(DatasetError, match="header says shape"):
        read_idx(path)
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((4, 4), np.uint8)))[:-6])
    with pytest.raises(DatasetError, match="gzip"):
        read_idx(path)


def test_idx_dataset_with_a_missing_file_raises_dataset_error(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", str(tmp_path))


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file()
    and not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte").is_file(),
    reason=f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR} (apt dataset-fashion-mnist)",
)
def test_fashion_mnist_reads_the_installed_debian_files() -> None:
    ds = load_dataset("fashion-mnist")  # default directory
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert ds.classes == FASHION_MNIST_CLASSES
    assert int(ds.train_x.max()) == 255 and int(ds.train_x.min()) == 0


# ---- digits ---------------------------------------------------------------------------------


def test_digits_shapes_classes_and_first_80_percent_per_class_train() -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert ds.train_x.shape[1:] == (1, 8, 8) and ds.test_x.shape[1:] == (1, 8, 8)
    assert ds.train_x.dtype == torch.uint8
    assert len(ds.train_x) + len(ds.test_x) == 1797
    assert ds.num_classes == 10 and ds.flip is False
    assert sorted(set(ds.train_y.tolist())) == list(range(10))
    assert sorted(set(ds.test_y.tolist())) == list(range(10))
    assert int(ds.train_x.max()) == 255  # sklearn's 0..16 scaled to 0..255

    # Train and test are disjoint: together they are exactly sklearn's images, each used once.
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    train_idx, test_idx = [], []
    for cls in range(10):
        idx = np.flatnonzero(bunch.target == cls)
        cut = int(0.8 * len(idx))
        train_idx += idx[:cut].tolist()
        test_idx += idx[cut:].tolist()
    assert not set(train_idx) & set(test_idx)
    assert np.array_equal(ds.train_x[:, 0].numpy(), images[sorted(train_idx)])
    assert np.array_equal(ds.test_x[:, 0].numpy(), images[sorted(test_idx)])
    assert ds.train_y.tolist() == bunch.target[sorted(train_idx)].tolist()


def test_digits_is_deterministic() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


# ---- split ----------------------------------------------------------------------------------


def _shuffled_labels(per_class: int, classes: int = 4, seed: int = 0) -> torch.Tensor:
    labels = torch.arange(classes).repeat_interleave(per_class)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_split_takes_per_class_counts_in_dataset_order() -> None:
    labels = _shuffled_labels(per_class=9)
    counts = SplitConfig(pretrain=4, retrain=2, pool=3)
    split = split_dataset(labels, counts)

    assert len(split.pretrain) == 16 and len(split.retrain) == 8 and len(split.pool) == 12
    for cls in range(4):
        idx = torch.nonzero(labels == cls).flatten()  # this class, in dataset order
        assert split.pretrain[labels[split.pretrain] == cls].tolist() == idx[:4].tolist()
        assert split.retrain[labels[split.retrain] == cls].tolist() == idx[4:6].tolist()
        assert split.pool[labels[split.pool] == cls].tolist() == idx[6:9].tolist()


def test_split_parts_are_disjoint_sorted_and_leave_the_surplus_out() -> None:
    labels = _shuffled_labels(per_class=12)
    split = split_dataset(labels, SplitConfig(pretrain=5, retrain=2, pool=3))
    parts = [set(split.pretrain.tolist()), set(split.retrain.tolist()), set(split.pool.tolist())]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert len(parts[0] | parts[1] | parts[2]) == 40  # 2 of 12 per class left unused
    for part in (split.pretrain, split.retrain, split.pool):
        assert part.dtype == torch.int64
        assert torch.equal(part, part.sort().values)


def test_split_is_deterministic() -> None:
    labels = _shuffled_labels(per_class=10, seed=5)
    counts = SplitConfig(pretrain=6, retrain=2, pool=2)
    a, b = split_dataset(labels, counts), split_dataset(labels.clone(), counts)
    assert torch.equal(a.pretrain, b.pretrain)
    assert torch.equal(a.retrain, b.retrain) and torch.equal(a.pool, b.pool)


def test_split_with_too_few_images_names_the_class_and_split_fields() -> None:
    labels = torch.cat([_shuffled_labels(per_class=10, classes=2), torch.full((4,), 2)])
    with pytest.raises(DatasetError) as info:
        split_dataset(labels, SplitConfig(pretrain=5, retrain=2, pool=3))
    message = str(info.value)
    assert "class 2 has 4" in message and "needs 10" in message
    for field in ("split.pretrain=5", "split.retrain=2", "split.pool=3"):
        assert field in message


def test_split_defaults_fit_the_real_digits_set() -> None:
    ds = load_dataset("digits")
    counts = DATASETS.get("digits").default_split
    split = split_dataset(ds.train_y, counts)
    assert len(split.pretrain) == 10 * counts.pretrain
    assert len(split.pool) == 10 * counts.pool
    assert DATASETS.get("cifar10").default_split == SplitConfig(pretrain=4800, retrain=50, pool=150)


# ---- augmentation ---------------------------------------------------------------------------


def _crop_offsets(out: torch.Tensor, x: torch.Tensor, pad: int) -> list[tuple[int, int] | None]:
    """For each image: the (dy, dx) at which it equals a crop of the zero-padded input."""
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[2:]
    found: list[tuple[int, int] | None] = []
    for i in range(len(x)):
        match = None
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w]):
                    match = (dy, dx)
        found.append(match)
    return found


def _pixels(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    # Distinct strictly positive values: a crop is identified uniquely, and padding (0) shows.
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=gen) * 0.98 + 0.01


@pytest.mark.parametrize(("side", "pad"), [(8, 1), (28, 3), (32, 4)])
def test_augment_without_flip_is_always_a_shifted_crop(side: int, pad: int) -> None:
    x = _pixels(96, 3, side, side)
    out = augment(x, flip=False, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    offsets = _crop_offsets(out, x, pad)
    assert all(o is not None for o in offsets)  # never mirrored, shift at most `pad`
    dys = {o[0] for o in offsets if o is not None}
    assert min(dys) == 0 and max(dys) == 2 * pad  # the full padding range is used


def test_augment_with_flip_mirrors_some_images_and_crops_all() -> None:
    x = _pixels(64, 1, 8, 8)
    out = augment(x, flip=True, generator=torch.Generator().manual_seed(2))
    plain = _crop_offsets(out, x, pad=1)
    mirrored = _crop_offsets(out.flip(3), x, pad=1)
    assert all(p is not None or m is not None for p, m in zip(plain, mirrored, strict=True))
    flipped = sum(p is None for p in plain)
    assert 10 < flipped < 54  # about half of 64


def test_augment_keeps_pixels_in_unit_range_and_shape() -> None:
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[:, :, :4] = 1.0
    x[:, :, -4:] = 0.0
    out = augment(x, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_augment_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    x = _pixels(16, 3, 32, 32)
    a = augment(x, flip=True, generator=torch.Generator().manual_seed(7))
    b = augment(x, flip=True, generator=torch.Generator().manual_seed(7))
    c = augment(x, flip=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)  # it does augment
    assert torch.equal(x, _pixels(16, 3, 32, 32))  # and leaves its input alone


# ---- pixel helpers --------------------------------------------------------------------------


def test_to_float_maps_uint8_to_unit_range() -> None:
    x = torch.tensor([[[[0, 51, 255]]]], dtype=torch.uint8)
    out = to_float(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[[[0.0, 0.2, 1.0]]]]))
    assert x.dtype == torch.uint8 and int(x[0, 0, 0, 2]) == 255  # input untouched


def test_channel_stats_match_numpy_per_channel() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (10, 3, 6, 5), dtype=torch.uint8, generator=gen)
    x[:, 2] = x[:, 2] // 4  # a darker, narrower channel
    mean, std = channel_stats(x)
    pixels = x.numpy().astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    assert len(mean) == 3 and len(std) == 3
    assert np.allclose(mean, pixels.mean(1), atol=1e-6)
    assert np.allclose(std, pixels.std(1, ddof=1), atol=1e-6)
    assert mean[2] < mean[0] and std[2] < std[0]


def test_channel_stats_floor_the_std_of_a_constant_channel() -> None:
    x = torch.full((4, 1, 3, 3), 128, dtype=torch.uint8)
    mean, std = channel_stats(x)
    assert mean == pytest.approx([128 / 255]) and std == pytest.approx([1e-3])


# ---- the registry ---------------------------------------------------------------------------


def test_every_catalog_dataset_has_a_registered_reader() -> None:
    missing = [spec.name for spec in DATASETS.entries() if spec.reader not in READERS]
    assert not missing


def test_dataset_error_is_a_bad_dataset_bulwark_error() -> None:
    error = DatasetError("missing train-images-idx3-ubyte[.gz] in /data")
    assert isinstance(error, BulwarkError) and isinstance(error, ValueError)
    assert error.kind is ErrorKind.BAD_DATASET
    assert error.user_message == "missing train-images-idx3-ubyte[.gz] in /data"


def test_a_new_reader_is_one_function_and_a_catalog_entry(tmp_path: Path) -> None:
    """A toy format (one .npy file per split) registered at run time loads like the built-ins."""
    rng = np.random.default_rng(5)
    train = rng.integers(0, 256, (6, 2, 3, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (2, 2, 3, 3), dtype=np.uint8)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "test.npy", test)
    spec = DatasetSpec(
        name="toy",
        title="toy .npy pairs",
        reader="toy-npy",
        num_classes=2,
        channels=2,
        size=(3, 3),
        class_names=("even", "odd"),
        flip=False,
    )
    seen: list[tuple[DatasetSpec, Path | None]] = []

    DATASETS.register(spec)
    try:

        @register_reader("toy-npy")
        def read_toy(spec: DatasetSpec, root: Path | None) -> ImageDataset:
            seen.append((spec, root))
            assert root is not None and spec.class_names is not None
            x, t = (torch.from_numpy(np.load(root / f"{part}.npy")) for part in ("train", "test"))
            y, u = torch.arange(len(x)) % 2, torch.arange(len(t)) % 2
            return ImageDataset(spec.name, x, y, t, u, spec.class_names, flip=spec.flip)

        with pytest.raises(ValueError, match="already registered"):
            register_reader("toy-npy")(read_toy)
        with pytest.raises(DatasetError, match="'toy' needs --data-dir"):
            load_dataset("toy")
        ds = load_dataset("toy", str(tmp_path))
    finally:
        DATASETS.unregister("toy")
        READERS.pop("toy-npy", None)

    assert seen == [(spec, tmp_path)]
    assert ds.name == "toy" and ds.classes == ("even", "odd") and ds.flip is False
    assert np.array_equal(ds.train_x.numpy(), train) and np.array_equal(ds.test_x.numpy(), test)
    assert ds.train_y.tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.channels == 2 and ds.input_size == (3, 3)
    assert "toy" not in DATASETS and "toy-npy" not in READERS
