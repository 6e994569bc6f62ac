"""Check an uploaded safetensors file without torch and without executing anything.

A safetensors file is an 8-byte little-endian header length N, a JSON header of N bytes
(``{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}`` plus an
optional ``"__metadata__"`` of strings), then the tensor bytes. We check that every tensor's
byte range matches its dtype and shape, and that the ranges tile the data exactly: nothing
overlaps, nothing is missing, nothing trails. ``infer_model_facts`` then checks every tensor's
name, shape and dtype against the architecture's state dict (``catalog.archs``), so a file
that passes would load on a worker.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog import ARCHS, recognize_arch
from catalog.archs import (
    HEAD_WEIGHT,
    NORMALIZE_BUFFERS,
    STEM_WEIGHT,
    DtypeKind,
    TensorFacts,
    compare_tensors,
    foreign_weights_message,
)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
PICKLE_OR_ZIP = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a bare pickle


class SafetensorsError(ValueError):
    """Not a valid safetensors file, or not one Bulwark can load; the message says what is
    wrong. ``problems`` lists each problem on its own (one line per kind of tensor mismatch)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def kind(self) -> DtypeKind:
        if self.dtype.startswith(("F", "BF")):
            return "floating"
        return "integer" if self.dtype.startswith(("I", "U")) else "other"


def looks_like_pickle(head: bytes) -> bool:
    return head.startswith(PICKLE_OR_ZIP)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors (name -> dtype, shape) and metadata of the safetensors file at ``path``."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"file is {size} bytes: too short for a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(
                f"header length {header_size} exceeds the file ({size} bytes) or the 100 MB limit"
            )
        raw = handle.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsError(f"header is not UTF-8 JSON: {error}") from None
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsError("__metadata__ must map strings to strings")
    data_size = size - 8 - header_size
    tensors: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        tensors[name], begin, end = _check_entry(name, entry)
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise SafetensorsError(
                f"tensor {name!r} starts at byte {begin}, expected {position}: "
                "tensor data overlaps or leaves a gap"
            )
        position = end
    if position != data_size:
        raise SafetensorsError(
            f"tensors cover {position} bytes but the file holds {data_size} bytes of data"
        )
    if not tensors:
        raise SafetensorsError("file holds no tensors")
    return tensors, metadata


def _check_entry(name: str, entry: Any) -> tuple[TensorInfo, int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"tensor {name!r}: expected keys dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise SafetensorsError(
            f"tensor {name!r}: dtype {dtype!r} not accepted; valid: {sorted(DTYPE_BYTES)}"
        )
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise SafetensorsError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_natural(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise SafetensorsError(f"tensor {name!r}: data_offsets must be [begin, end], begin <= end")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise SafetensorsError(
            f"tensor {name!r}: {dtype} {shape} needs {expected} bytes, "
            f"data_offsets give {offsets[1] - offsets[0]}"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape)), offsets[0], offsets[1]


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def infer_model_facts(tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    """Arch, input channels, classes and feature size of a Bulwark model, with every tensor
    checked against that architecture's state dict.

    The arch follows from the tensor names (``catalog.recognize_arch``, the rule
    ``core.checkpoint.infer_facts`` uses too), the input channels and classes from the stem's
    and the head's shapes; then every name, shape and dtype must be those of
    ``ArchSpec.expected_tensors(in_channels, num_classes)`` (the normalization buffers may be
    absent, both together), so an upload that passes here loads on a worker. Every mismatch
    is reported at once: one problem per kind, the first few names of each and their count.
    """
    stem, head = tensors.get(STEM_WEIGHT), tensors.get(HEAD_WEIGHT)
    arch = recognize_arch(tensors.keys())
    if arch is None or stem is None or head is None or len(stem.shape) != 4 or len(head.shape) != 2:
        raise SafetensorsError(foreign_weights_message(tensors.keys()))
    in_channels, num_classes = stem.shape[1], head.shape[0]
    spec = ARCHS.get(arch)
    mismatch = compare_tensors(
        spec.expected_tensors(in_channels, num_classes),
        {name: TensorFacts(t.shape, t.dtype, t.kind) for name, t in tensors.items()},
    )
    if not mismatch.fits:
        context = (
            f"the weights do not fit {arch} ({in_channels} input channels, {num_classes} classes)"
        )
        problems = [f"{context}: {problem}" for problem in mismatch.problems()]
        raise SafetensorsError("; ".join(problems), problems)
    return {
        "arch": arch,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "feature_dim": spec.feature_dim,
        "has_normalization": all(name in tensors for name in NORMALIZE_BUFFERS),
    }
