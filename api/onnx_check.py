"""Tell an ONNX upload apart by its name and its first bytes, without the onnx package.

An ONNX file is a serialized ``onnx.ModelProto`` (protobuf). Protobuf writers emit the fields
of a message in field-number order, and ``ir_version`` (field 1, a varint) is always set, so a
model starts with the byte 0x08 and a small version, followed by the fields below in order with
their wire types. ``looks_like_onnx`` parses as many fields as the first bytes hold; it is a
cheap sanity check of the format, not a validation of the graph (the worker's converter does
that).
"""

from __future__ import annotations

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
}


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
