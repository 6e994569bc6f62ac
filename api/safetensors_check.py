"""Check an uploaded safetensors file without torch and without executing anything.

A safetensors file is an 8-byte little-endian header length N, a JSON header of N bytes
(``{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}`` plus an
optional ``"__metadata__"`` of strings), then the tensor bytes. We check that every tensor's
byte range matches its dtype and shape, and that the ranges tile the data exactly: nothing
overlaps, nothing is missing, nothing trails.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog import ARCHS, recognize_arch
from catalog.archs import HEAD_WEIGHT, STEM_WEIGHT

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
    """Not a valid safetensors file; the message says what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


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
    """Arch, input channels, classes and feature size of a Bulwark model, from its tensor
    names (``catalog.recognize_arch``, the rule ``core.checkpoint.infer_facts`` uses too) and
    shapes."""
    stem, head = tensors.get(STEM_WEIGHT), tensors.get(HEAD_WEIGHT)
    if stem is None or head is None or len(stem.shape) != 4 or len(head.shape) != 2:
        raise SafetensorsError(
            f"not a Bulwark model: expected a 4-D {STEM_WEIGHT} and a 2-D {HEAD_WEIGHT} "
            "(state dict of core.models.FeatureClassifier)"
        )
    arch = recognize_arch(tensors.keys())
    if arch is None:
        raise SafetensorsError(
            f"the tensor names match none of the architectures {', '.join(ARCHS)}"
        )
    return {
        "arch": arch,
        "in_channels": stem.shape[1],
        "num_classes": head.shape[0],
        "feature_dim": head.shape[1],
        "has_normalization": "normalize.mean" in tensors and "normalize.std" in tensors,
    }
