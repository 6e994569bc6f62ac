"""Tell an ONNX upload apart by its name and its first bytes, without the onnx package.

An ONNX file is a serialized ``onnx.ModelProto`` (protobuf). Protobuf writers emit the fields
of a message in field-number order, and ``ir_version`` (field 1, a varint) is always set, so a
model starts with the byte 0x08 and a small version, followed by the fields below in order with
their wire types. ``looks_like_onnx`` parses as many fields as the first bytes hold; it is a
cheap sanity check of the format, not a validation of the graph (the worker's converter does
that).

Where the deployment converts ONNX (``Settings.onnx_enabled``), ``check_onnx_file`` walks every
top-level field of the whole file before it is queued: it reads only varints and the small
``opset_import`` entries and skips every other field by its length (the graph is never parsed
here: nothing but this module's own varint reader touches the bytes). The fields must be known,
in order and end exactly at the end of the file; there must be one graph; and the operator sets
imported must be the standard one (custom domains name operators no converter has).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

ONNX_SUFFIX = ".onnx"
SNIFF_BYTES = 256  # how much of the file the API reads to tell its format
MAX_IR_VERSION = 64  # ONNX is at IR version 11 (2025); far above is not a version
VARINT, LENGTH_DELIMITED = 0, 2
# ModelProto's fields (onnx/onnx.proto): number -> wire type.
MODEL_PROTO_FIELDS = {
    1: VARINT,  # ir_version
    2: LENGTH_DELIMITED,  # producer_name
    3: LENGTH_DELIMITED,  # producer_version
    4: LENGTH_DELIMITED,  # domain
    5: VARINT,  # model_version
    6: LENGTH_DELIMITED,  # doc_string
    7: LENGTH_DELIMITED,  # graph
    8: LENGTH_DELIMITED,  # opset_import (repeated)
    14: LENGTH_DELIMITED,  # metadata_props (repeated)
    20: LENGTH_DELIMITED,  # training_info (repeated)
    25: LENGTH_DELIMITED,  # functions (repeated)
    26: LENGTH_DELIMITED,  # configuration (repeated; IR version 11)
}
GRAPH_FIELD, OPSET_FIELD, FUNCTIONS_FIELD = 7, 8, 25
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})  # the default operator set, by both its names
MAX_TOP_LEVEL_FIELDS = 10_000  # opset imports and metadata entries repeat; real files have tens
MAX_OPSET_ENTRY_BYTES = 1024  # an OperatorSetIdProto is a domain name and a version


def named_onnx(filename: str | None) -> bool:
    return (filename or "").lower().endswith(ONNX_SUFFIX)


def looks_like_onnx(head: bytes, size: int) -> bool:
    """True when ``head``, the first bytes of a file of ``size`` bytes, parses as the start of
    an ONNX ModelProto: ``ir_version`` first, then known fields in order with their wire
    types, each length within the file."""
    position, previous = 0, 0
    while position < len(head):
        key, position = _varint(head, position)
        if key is None:  # cut off by the end of head (what was read is consistent), or too long
            return previous > 0 and position >= len(head)
        number, wire = key >> 3, key & 7
        if MODEL_PROTO_FIELDS.get(number) != wire or number < previous:
            return False
        value, position = _varint(head, position)
        if value is None:
            return previous > 0 and position >= len(head)
        if previous == 0 and (number != 1 or not 1 <= value <= MAX_IR_VERSION):
            return False
        if wire == LENGTH_DELIMITED:
            if position + value > size:
                return False
            position += value
        previous = number
    return previous > 0


def _varint(data: bytes, position: int) -> tuple[int | None, int]:
    """The base-128 varint at ``position`` and the position after it; None where ``data``
    ends first or the varint runs past 10 bytes (64 bits)."""
    value = shift = 0
    while position < len(data) and shift < 70:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    return None, position


class OnnxContainerError(ValueError):
    """The file is not a well-formed ONNX ModelProto the converter could take; says why."""


@dataclass(frozen=True)
class OnnxContainer:
    """What the top level of an ONNX file declares."""

    ir_version: int
    opsets: dict[str, int]  # operator set domain ("" is the standard one) -> version


def check_onnx_file(path: Path) -> OnnxContainer:
    """Walk the top-level fields of the ONNX file at ``path`` (see the module docstring);
    raises :class:`OnnxContainerError` naming the first problem."""
    size = path.stat().st_size
    ir_version: int | None = None
    opsets: dict[str, int] = {}
    graphs = previous = 0
    with path.open("rb") as handle:
        for _ in range(MAX_TOP_LEVEL_FIELDS):
            position = handle.tell()
            if position == size:
                break
            key = _read_varint(handle)
            number, wire = key >> 3, key & 7
            if MODEL_PROTO_FIELDS.get(number) != wire:
                raise OnnxContainerError(
                    f"byte {position}: field {number} (wire type {wire}) is not a field of an "
                    "ONNX ModelProto"
                )
            if number < previous:
                raise OnnxContainerError(
                    f"byte {position}: field {number} after field {previous} (a ModelProto "
                    "writes its fields in order)"
                )
            if previous == 0 and number != 1:
                raise OnnxContainerError("an ONNX ModelProto starts with its ir_version")
            value = _read_varint(handle)
            if wire == VARINT:
                if number == 1:
                    if not 1 <= value <= MAX_IR_VERSION:
                        raise OnnxContainerError(f"ir_version {value} is not an ONNX IR version")
                    ir_version = value
            elif handle.tell() + value > size:
                raise OnnxContainerError(
                    f"byte {position}: field {number} declares {value} bytes, past the end of "
                    f"the file ({size} bytes): the file is cut short"
                )
            elif number == OPSET_FIELD:
                domain, version = _opset_entry(handle, value)
                opsets[domain] = version
            else:
                if number == GRAPH_FIELD:
                    graphs += 1
                if number == FUNCTIONS_FIELD:
                    raise OnnxContainerError(
                        "the model defines its own functions (custom operators); only graphs "
                        "of standard ONNX operators can be converted"
                    )
                handle.seek(value, 1)
            previous = number
        else:
            raise OnnxContainerError(f"more than {MAX_TOP_LEVEL_FIELDS} top-level fields")
    if ir_version is None:
        raise OnnxContainerError("an ONNX ModelProto starts with its ir_version")
    if graphs != 1:
        raise OnnxContainerError(f"an ONNX model holds one graph; this file holds {graphs}")
    custom = sorted(domain for domain in opsets if domain not in STANDARD_DOMAINS)
    if custom:
        raise OnnxContainerError(
            f"the model imports custom operator sets {custom}; only the standard ONNX "
            "operators (domain '' / 'ai.onnx') can be converted"
        )
    if not opsets:
        raise OnnxContainerError("the model imports no operator set (opset_import is empty)")
    return OnnxContainer(ir_version=ir_version, opsets=opsets)


def _opset_entry(handle: BinaryIO, length: int) -> tuple[str, int]:
    """One OperatorSetIdProto: ``domain`` (field 1, a string) and ``version`` (field 2)."""
    if length > MAX_OPSET_ENTRY_BYTES:
        raise OnnxContainerError(f"an opset_import entry of {length} bytes")
    data = handle.read(length)
    domain, version, position = "", 0, 0
    while position < len(data):
        key, position = _varint(data, position)
        value, position = _varint(data, position) if key is not None else (None, position)
        if key is None or value is None:
            raise OnnxContainerError("an opset_import entry is cut short")
        if key == (1 << 3 | LENGTH_DELIMITED):
            if position + value > len(data):
                raise OnnxContainerError("an opset_import domain runs past its entry")
            try:
                domain = data[position : position + value].decode("utf-8")
            except UnicodeDecodeError:
                raise OnnxContainerError("an opset_import domain is not UTF-8") from None
            position += value
        elif key == (2 << 3 | VARINT):
            version = value
        else:
            raise OnnxContainerError(f"an opset_import entry with field {key >> 3}")
    return domain, version


def _read_varint(handle: BinaryIO) -> int:
    """The varint at the handle's position (at most 10 bytes)."""
    data = b""
    for _ in range(10):
        byte = handle.read(1)
        if not byte:
            raise OnnxContainerError("the file ends inside a field's key or length")
        data += byte
        if not byte[0] & 0x80:
            break
    value, _ = _varint(data, 0)
    if value is None:
        raise OnnxContainerError("a varint longer than 64 bits")
    return value
