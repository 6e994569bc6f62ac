"""Tenant datasets: the ``npz`` reader, archives of image folders and CIFAR batches, the
canonical npz, the audit-only split, and ``--dataset data.npz`` from the CLI to the report.

Every file is written here in its real format (``np.savez``, PNGs, CIFAR pickle batches, zips
and tars) and read back through the functions the worker and the CLI call.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from catalog import DATASETS, SplitConfig
from core.archives import ArchiveLimits
from core.checkpoint import save_extractor
from core.config import AuditConfig, pretrain_config
from core.data import DatasetError, ImageDataset, split_dataset
from core.datasets import load_dataset
from core.datasets.npz import read_npz
from core.datasets.tenant import dataset_facts, read_tenant_dataset, write_canonical_npz

LIMITS = ArchiveLimits()
CLASSES = np.array(["cat", "dog", "bird"])


def _arrays(shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """x_train / x_test of ``shape`` per image, labels covering three classes."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (6, *shape), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 0, 1, 2], dtype=np.int32),
        "x_test": rng.integers(0, 256, (3, *shape), dtype=np.uint8),
        "y_test": np.array([2, 1, 0], dtype=np.uint8),
    }


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _tenant(upload: Path, fmt: str, tmp_path: Path, **kwargs: object) -> ImageDataset:
    return read_tenant_dataset(
        upload,
        fmt,  # type: ignore[arg-type]
        work_dir=tmp_path / "work",
        limits=kwargs.pop("limits", LIMITS),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


# ---- npz: layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "to_nchw"),
    [
        ((5, 7, 3), lambda x: x.transpose(0, 3, 1, 2)),  # NHWC
        ((3, 5, 7), lambda x: x),  # NCHW
        ((5, 7, 1), lambda x: x.transpose(0, 3, 1, 2)),  # NHWC grey
        ((1, 5, 7), lambda x: x),  # NCHW grey
        ((5, 7), lambda x: x[:, None]),  # NHW grey
        ((3, 5, 3), lambda x: x.transpose(0, 3, 1, 2)),  # ambiguous: NHWC by the rule
    ],
    ids=["nhwc", "nchw", "nhwc-grey", "nchw-grey", "nhw", "ambiguous-is-nhwc"],
)
def test_npz_round_trips_every_layout(
    tmp_path: Path, shape: tuple[int, ...], to_nchw: Callable[[np.ndarray], np.ndarray]
) -> None:
    arrays = _arrays(shape)
    path = _npz(tmp_path / "pets.npz", **arrays, classes=CLASSES)
    for ds in (load_dataset("npz", str(path)), _tenant(path, "npz", tmp_path)):
        assert ds.name == "pets" and ds.classes == ("cat", "dog", "bird") and ds.flip is False
        assert ds.train_x.dtype == torch.uint8 and ds.train_x.is_contiguous()
        assert np.array_equal(ds.train_x.numpy(), to_nchw(arrays["x_train"]))
        assert np.array_equal(ds.test_x.numpy(), to_nchw(arrays["x_test"]))
        assert ds.train_y.dtype == torch.int64 and ds.train_y.tolist() == [0, 1, 2, 0, 1, 2]
        assert ds.test_y.tolist() == [2, 1, 0]


def test_npz_without_classes_names_them_by_number(tmp_path: Path) -> None:
    ds = read_npz(_npz(tmp_path / "d.npz", **_arrays((4, 4, 3))))
    assert ds.classes == ("0", "1", "2")


def test_the_npz_entry_reads_a_file_and_needs_one(tmp_path: Path) -> None:
    spec = DATASETS.get("npz")
    assert spec.data_file == ".npz" and spec.default_split == SplitConfig(
        pretrain=0, retrain=10, pool=25
    )
    with pytest.raises(DatasetError, match=r"'npz' needs --data-dir: the path of its \.npz file"):
        load_dataset("npz")
    with pytest.raises(DatasetError, match="is not a file"):
        load_dataset("npz", str(tmp_path))


# ---- npz: pickles ---------------------------------------------------------------------------


class _TouchOnUnpickle:
    """A pickle payload: unpickling it runs ``touch <path>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


def _evil_npz(path: Path, marker: Path, member: str = "x_train") -> Path:
    arrays: dict[str, np.ndarray] = {**_arrays((4, 4, 3)), "classes": CLASSES}
    arrays[member] = np.array([_TouchOnUnpickle(marker)] * 6, dtype=object)
    return _npz(path, **arrays)  # np.savez pickles an object array


def test_the_npz_payload_is_live_under_allow_pickle(tmp_path: Path) -> None:
    """Control for the next tests: loading the member with pickles allowed creates the file."""
    path = _evil_npz(tmp_path / "evil.npz", tmp_path / "control")
    with np.load(path, allow_pickle=True) as loaded:
        loaded["x_train"]
    assert (tmp_path / "control").exists()


@pytest.mark.parametrize("member", ["x_train", "y_test", "classes"])
def test_a_pickle_inside_the_npz_is_refused_and_runs_nothing(tmp_path: Path, member: str) -> None:
    marker = tmp_path / "pwned"
    path = _evil_npz(tmp_path / "evil.npz", marker, member)
    with pytest.raises(DatasetError, match=f"evil.npz: {member} holds Python objects"):
        load_dataset("npz", str(path))
    with pytest.raises(DatasetError, match=f"{member} holds Python objects"):
        _tenant(path, "npz", tmp_path)
    assert not marker.exists()


def test_allow_pickle_false_refuses_the_pickle_even_past_the_header_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the header check, np.load(allow_pickle=False) is what refuses."""
    import core.datasets.npz

    monkeypatch.setattr(core.datasets.npz, "_check_header", lambda *args: None)
    marker = tmp_path / "pwned"
    path = _evil_npz(tmp_path / "evil.npz", marker)
    with pytest.raises(DatasetError, match="x_train is not a readable array: Object arrays"):
        load_dataset("npz", str(path))
    assert not marker.exists()


# ---- npz: what is refused -------------------------------------------------------------------


def _bad(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    arrays = {**_arrays((4, 4, 3)), "classes": CLASSES}
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return arrays


RNG = np.random.default_rng(1)
REFUSED = {
    "float-images": (_bad(x_train=RNG.random((6, 4, 4, 3))), "x_train is float64; .*uint8"),
    "2-d-images": (_bad(x_train=np.zeros((6, 48), np.uint8)), r"x_train has shape \(6, 48\)"),
    "2-channels": (_bad(x_train=np.zeros((6, 4, 4, 2), np.uint8)), "with C = 1 or 3"),
    "5-d-images": (_bad(x_test=np.zeros((3, 1, 4, 4, 3), np.uint8)), "x_test has shape"),
    "sizes-differ": (_bad(x_test=np.zeros((3, 5, 5, 3), np.uint8)), "3x4x4 but x_test .* 3x5x5"),
    "2-d-labels": (_bad(y_train=np.zeros((6, 1), np.int64)), "y_train .* must be 1-D"),
    "float-labels": (_bad(y_train=np.zeros(6)), "y_train is float64; labels must be integers"),
    "bool-labels": (_bad(y_test=np.ones(3, bool)), "y_test is bool"),
    "lengths-differ": (_bad(y_train=np.zeros(5, np.int64)), "5 labels for 6 images in x_train"),
    "label-too-big": (_bad(y_train=np.array([0, 1, 2, 3, 1, 2])), r"labels must lie in \[0, 2\]"),
    "negative-label": (_bad(y_test=np.array([0, -1, 2])), "y_test: labels must be >= 0"),
    "one-class": (
        _bad(y_train=np.zeros(6, np.int64), y_test=np.zeros(3, np.int64), classes=CLASSES[:1]),
        "1 class; an audit needs 2 or more",
    ),
    "class-without-training-images": (
        _bad(y_train=np.array([0, 1, 0, 1, 0, 1])),
        "no training images of class 2 \\('bird'\\)",
    ),
    "empty-test-set": (
        _bad(x_test=np.zeros((0, 4, 4, 3), np.uint8), y_test=np.zeros(0, np.int64)),
        "the test set is empty",
    ),
    "missing-member": (_bad(y_test=None), "lacks y_test"),
    "bytes-classes": (_bad(classes=np.array([b"a", b"b", b"c"])), "unicode strings"),
    "repeated-classes": (_bad(classes=np.array(["a", "b", "a"])), "class names repeat"),
    "labels-beyond-images": (
        _bad(classes=None, y_train=np.array([0, 1, 2, 0, 1, 900])),
        "labels reach 900 with 6 training images",
    ),
}


@pytest.mark.parametrize(("arrays", "problem"), REFUSED.values(), ids=REFUSED.keys())
def test_an_invalid_npz_is_refused_naming_the_problem(
    tmp_path: Path, arrays: dict[str, np.ndarray], problem: str
) -> None:
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=problem) as info:
        load_dataset("npz", str(path))
    assert str(info.value).startswith("bad.npz")
    with pytest.raises(DatasetError, match=problem) as info:
        _tenant(path, "npz", tmp_path, name="My Pets.npz")  # named as the tenant named it
    assert str(info.value).startswith("My Pets")


def test_an_npy_header_declaring_more_than_it_stores_is_refused(tmp_path: Path) -> None:
    arrays = _arrays((4, 4, 3))
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            if key == "x_test":  # a header declaring 48 GB, then 10 bytes
                header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 3, 4, 4)}
                np.lib.format.write_array_header_1_0(buffer, header)
                buffer.write(bytes(10))
            else:
                np.lib.format.write_array(buffer, array)
            archive.writestr(f"{key}.npy", buffer.getvalue())
    with pytest.raises(DatasetError, match=r"x_test declares shape \(1000000000, 3, 4, 4\)"):
        read_npz(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"not a zip at all", "not a readable .npz"),
        (None, "a single .npy array"),
    ],
)
def test_a_file_that_is_no_npz_is_refused(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "x.npz"
    if content is None:
        with path.open("wb") as handle:
            np.save(handle, np.zeros(3, np.uint8))
    else:
        path.write_bytes(content)
    with pytest.raises(DatasetError, match=problem):
        read_npz(path)


def test_an_npz_upload_is_held_to_the_archive_limits(tmp_path: Path) -> None:
    path = _npz(tmp_path / "big.npz", **_arrays((4, 4, 3)))
    with pytest.raises(DatasetError, match=r"big: member 'x_train\.npy'.* more than 100 bytes"):
        _tenant(path, "npz", tmp_path, limits=ArchiveLimits(max_total_bytes=100))


# ---- the canonical npz and the facts --------------------------------------------------------


def test_the_canonical_npz_reads_back_identically(tmp_path: Path) -> None:
    original = read_npz(_npz(tmp_path / "pets.npz", **_arrays((5, 7, 3)), classes=CLASSES))
    staged = tmp_path / "staged-file"  # a staging name without the suffix: kept as given
    write_canonical_npz(original, staged)
    assert staged.is_file() and not (tmp_path / "staged-file.npz").exists()
    with np.load(staged, allow_pickle=False) as stored:
        assert sorted(stored.files) == ["classes", "x_test", "x_train", "y_test", "y_train"]
        assert stored["x_train"].shape == (6, 3, 5, 7) and stored["y_train"].dtype == np.int64
        assert stored["classes"].dtype.kind == "U"
    again = read_npz(staged, name="pets")
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, field), getattr(original, field))
    assert again.classes == original.classes and again.name == original.name


def test_dataset_facts_count_every_class(tmp_path: Path) -> None:
    data = read_npz(_npz(tmp_path / "pets.npz", **_arrays((5, 7, 3)), classes=CLASSES))
    assert dataset_facts(data) == {
        "name": "pets",
        "classes": ["cat", "dog", "bird"],
        "num_classes": 3,
        "channels": 3,
        "height": 5,
        "width": 7,
        "train_images": 6,
        "test_images": 3,
        "train_per_class": [2, 2, 2],
        "test_per_class": [1, 1, 1],
    }
    json.dumps(dataset_facts(data))  # what a row's JSON column takes


# ---- image-folder archives ------------------------------------------------------------------


def _image_folder(root: Path, mode: str = "RGB") -> dict[str, list[np.ndarray]]:
    """train/{cat,dog}/*.png and test/{cat,dog}/*.png; the arrays in reading order."""
    rng = np.random.default_rng(3)
    shape = (5, 7) if mode == "L" else (5, 7, 3)
    written: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, counts in (("train", {"cat": 3, "dog": 2}), ("test", {"cat": 1, "dog": 2})):
        for cls, count in counts.items():
            (root / split / cls).mkdir(parents=True)
            for j in range(count):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(root / split / cls / f"{j:03d}.png")
                written[split].append(pixels)
    return written


def _archive(folder: Path, path: Path, arcname: str) -> Path:
    """``folder``'s files in a zip or tar at ``path``, under ``arcname`` ("" for the root)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    names = [
        (p, "/".join(filter(None, [arcname, p.relative_to(folder).as_posix()]))) for p in files
    ]
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for file, name in names:
                archive.write(file, name)
    else:
        with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as archive:
            for file, name in names:
                archive.add(file, name)
    return path


@pytest.mark.parametrize(
    ("upload", "arcname", "mode"),
    [
        ("pets.zip", "", "RGB"),
        ("pets.zip", "pets", "L"),
        ("pets.tar.gz", "pets", "RGB"),
        ("pets.tar", "", "L"),
    ],
)
def test_an_image_folder_archive_is_read_pixel_for_pixel(
    tmp_path: Path, upload: str, arcname: str, mode: str
) -> None:
    written = _image_folder(tmp_path / "src", mode)
    path = _archive(tmp_path / "src", tmp_path / upload, arcname)
    ds = _tenant(path, "image-folder", tmp_path)
    assert ds.name == "pets" and ds.classes == ("cat", "dog")
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1] and ds.test_y.tolist() == [0, 1, 1]
    for tensor, arrays in ((ds.train_x, written["train"]), (ds.test_x, written["test"])):
        for image, pixels in zip(tensor, arrays, strict=True):
            expected = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
            assert np.array_equal(image.numpy(), expected)
    assert not any((tmp_path / "work").iterdir())  # the extracted files are gone


def test_an_image_folder_archive_error_names_the_upload_not_a_server_path(tmp_path: Path) -> None:
    _image_folder(tmp_path / "src")
    (tmp_path / "src" / "test").rename(tmp_path / "src" / "holdout")
    path = _archive(tmp_path / "src", tmp_path / "upload.zip", "")
    with pytest.raises(DatasetError) as info:
        _tenant(path, "image-folder", tmp_path, name="My Pets.zip")
    message = str(info.value)
    assert "image folder My Pets needs train/<class>/ and test/<class>/" in message
    assert str(tmp_path) not in message
    assert not any((tmp_path / "work").iterdir())


def test_an_image_folder_archive_with_an_escaping_member_is_refused(tmp_path: Path) -> None:
    _image_folder(tmp_path / "src")
    path = _archive(tmp_path / "src", tmp_path / "pets.zip", "")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("../../escaped.png", b"x")
    with pytest.raises(DatasetError, match=r"pets: member '\.\./\.\./escaped\.png': a '\.\.'"):
        _tenant(path, "image-folder", tmp_path)
    assert not any((tmp_path / "work").iterdir())
    assert not (tmp_path / "escaped.png").exists()


def test_an_image_folder_archive_with_one_class_is_refused(tmp_path: Path) -> None:
    _image_folder(tmp_path / "src")
    for split in ("train", "test"):
        for png in (tmp_path / "src" / split / "dog").iterdir():
            png.unlink()
        (tmp_path / "src" / split / "dog").rmdir()
    path = _archive(tmp_path / "src", tmp_path / "pets.tar", "")
    with pytest.raises(DatasetError, match="at least two class sub-folders"):
        _tenant(path, "image-folder", tmp_path)


# ---- CIFAR-10 batches in an archive ---------------------------------------------------------


def _cifar_batches(folder: Path, per_batch: int = 4, test_size: int = 6) -> dict[str, np.ndarray]:
    """The five training batches, the test batch and batches.meta, as CIFAR-10 has them."""
    rng = np.random.default_rng(4)
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 7):
        size = per_batch if i <= 5 else test_size
        data = rng.integers(0, 256, (size, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(size) % 10)]
        name = f"data_batch_{i}" if i <= 5 else "test_batch"
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        xs.append(data)
        ys.append(labels)
    names = [n.encode() for n in ("plane", "car", "bird", "cat", "deer")]
    names += [n.encode() for n in ("dog", "frog", "horse", "ship", "truck")]
    meta = {b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {
        "train_x": np.concatenate(xs[:5]).reshape(-1, 3, 32, 32),
        "train_y": np.concatenate(ys[:5]),
        "test_x": xs[5].reshape(-1, 3, 32, 32),
        "test_y": np.array(ys[5]),
    }


@pytest.mark.parametrize(
    ("upload", "arcname"),
    [("cifar-10-python.tar.gz", "cifar-10-batches-py"), ("batches.zip", "")],
)
def test_cifar10_batches_in_an_archive_are_read(tmp_path: Path, upload: str, arcname: str) -> None:
    # Ten images a batch: every class has training images (check_dataset needs them).
    written = _cifar_batches(tmp_path / "src", per_batch=10, test_size=10)
    path = _archive(tmp_path / "src", tmp_path / upload, arcname)
    ds = _tenant(path, "cifar10", tmp_path)
    assert ds.name == upload.split(".")[0] and ds.classes[:2] == ("plane", "car")
    assert np.array_equal(ds.train_x.numpy(), written["train_x"])
    assert np.array_equal(ds.train_y.numpy(), written["train_y"])
    assert np.array_equal(ds.test_x.numpy(), written["test_x"])
    assert np.array_equal(ds.test_y.numpy(), written["test_y"])
    assert not any((tmp_path / "work").iterdir())


def test_a_cifar10_archive_missing_a_batch_names_it(tmp_path: Path) -> None:
    _cifar_batches(tmp_path / "src", per_batch=10, test_size=10)
    (tmp_path / "src" / "data_batch_3").unlink()
    path = _archive(tmp_path / "src", tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    with pytest.raises(DatasetError, match="missing data_batch_3") as info:
        _tenant(path, "cifar10", tmp_path)
    assert str(tmp_path) not in str(info.value)


# ---- the audit-only split -------------------------------------------------------------------


def test_a_split_may_have_no_pretraining_images_for_an_audit() -> None:
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    split = split_dataset(labels, SplitConfig(pretrain=0, retrain=1, pool=3))
    assert split.pretrain.tolist() == []
    assert split.retrain.tolist() == [0, 1] and split.pool.tolist() == [2, 3, 4, 5, 6, 7]
    config = AuditConfig(model="m", dataset="npz", data_dir="d.npz")
    assert config.resolved_split == SplitConfig(pretrain=0, retrain=10, pool=25)


def test_a_class_too_small_for_the_tenant_split_is_named() -> None:
    labels = torch.tensor([0] * 40 + [1] * 20)
    with pytest.raises(DatasetError, match=r"class 1 has 20 training images; the split needs 35"):
        split_dataset(labels, DATASETS.get("npz").default_split)


def test_pretraining_refuses_a_split_without_pretraining_images() -> None:
    with pytest.raises(ValidationError, match=r"split.pretrain=0 \(the default split of .*npz"):
        pretrain_config(dataset="npz")
    with pytest.raises(ValidationError, match=r"pre-training needs split\.pretrain >= 1"):
        pretrain_config(dataset="digits", split={"pretrain": 0, "retrain": 10, "pool": 25})
    assert pretrain_config(dataset="npz", split={"pretrain": 5, "retrain": 1, "pool": 1})


# ---- the CLI: --dataset data.npz ------------------------------------------------------------


def test_dataset_argument_maps_an_npz_file_and_a_folder(tmp_path: Path) -> None:
    import argparse

    from bulwark.commands.requests import dataset_argument

    path = _npz(tmp_path / "data.npz", **_arrays((4, 4, 3)))
    assert dataset_argument(str(path)) == ("npz", str(path))
    assert dataset_argument(str(tmp_path)) == ("image-folder", str(tmp_path))
    assert dataset_argument("digits") == ("digits", None)
    (tmp_path / "data.csv").write_text("x")
    for text in (str(tmp_path / "absent.npz"), str(tmp_path / "data.csv")):
        with pytest.raises(argparse.ArgumentTypeError, match=r"or of a \.npz file"):
            dataset_argument(text)


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sklearn's digits as an NHWC .npz a user would write, with its class names."""
    digits = load_dataset("digits")
    path = tmp_path_factory.mktemp("npz") / "digits.npz"
    return _npz(
        path,
        x_train=digits.train_x.permute(0, 2, 3, 1).numpy(),
        y_train=digits.train_y.numpy(),
        x_test=digits.test_x.permute(0, 2, 3, 1).numpy(),
        y_test=digits.test_y.numpy(),
        classes=np.array(digits.classes),
    )


def test_cli_audits_an_npz_file_end_to_end(
    digits_extractor, digits_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bulwark.cli import main

    loaded = digits_extractor("none")
    checkpoint = tmp_path / "checkpoint"
    save_extractor(checkpoint, loaded.model, loaded.manifest)
    out = tmp_path / "report.json"
    args = ["audit", "--model", str(checkpoint), "--dataset", str(digits_npz), "--attacks", "bp"]
    args += ["--pairs", "0:7", "--targets-per-pair", "2", "--iterations", "5"]
    code = main([*args, "--retrain-epochs", "5", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["config"]["dataset"] == "npz"
    assert report["dataset"]["split"] == {"pretrain": 0, "retrain": 10, "pool": 25}
    assert report["dataset"]["retrain_images"] == 100 and report["dataset"]["pool_images"] == 250
    assert report["dataset"]["classes"] == list("0123456789")
    assert report["head_init"] == "pretrained"  # the digits model's classes fit
    assert "BP" in capsys.readouterr().out


@pytest.mark.slow  # a CLI subprocess or a whole audit: out of make test-fast
def test_cli_pretrains_on_an_npz_file_given_a_split(
    digits_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bulwark.cli import main

    out = tmp_path / "run"
    base = ["pretrain", "--dataset", str(digits_npz), "--arch", "convnet", "--recipe", "quick"]
    assert main([*base, "--epochs", "1", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "--split" in error and "split.pretrain=0" in error
    assert not out.exists()

    assert main([*base, "--epochs", "1", "--split", "60:10:25", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["dataset"] == "npz"
    assert manifest["config"]["data_dir"] == str(digits_npz)
    assert manifest["split"] == {"pretrain": 60, "retrain": 10, "pool": 25}
    assert manifest["classes"] == list("0123456789") and manifest["input_shape"] == [1, 8, 8]
