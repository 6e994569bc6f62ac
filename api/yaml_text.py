"""A small YAML emitter for card front matter: dicts, lists, strings, numbers, bools, None.

PyYAML is not a runtime dependency, and the front matter of a model card is plain data, so
this writes block-style YAML by hand. Strings are plain only where no YAML reading could take
them for anything else (letters, digits and ``_ . - /`` and inner spaces, starting with a
letter, not a boolean or null word); every other string is double-quoted with each character
outside YAML's printable set, and every line break, escaped. Floats always carry a dot, so a
YAML 1.1 reader (PyYAML) reads them as floats too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

_PLAIN = re.compile(r"[A-Za-z](?:[A-Za-z0-9_./ -]*[A-Za-z0-9_./-])?")
# Words YAML 1.1 or 1.2 read as booleans or null, whatever their case.
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}
_BREAKS = {"\x85", "\u2028", "\u2029"}


def _printable(char: str) -> bool:
    """YAML's printable set (c-printable), less the line breaks a quoted string would fold."""
    code = ord(char)
    if char in _BREAKS:
        return False
    return (
        0x20 <= code <= 0x7E
        or 0xA0 <= code <= 0xD7FF
        or 0xE000 <= code <= 0xFFFD
        or 0x10000 <= code <= 0x10FFFF
    ) and code != 0xFEFF


def quote(text: str) -> str:
    """``text`` as a double-quoted YAML scalar."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif _printable(char):
            out.append(char)
        elif ord(char) <= 0xFF:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def string(text: str) -> str:
    """``text`` plain where that is unambiguous, else double-quoted."""
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return quote(text)


def scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        if "." not in text:  # 1e-05 -> 1.0e-05 (YAML 1.1 floats need the dot)
            mantissa, _, exponent = text.partition("e")
            text = f"{mantissa}.0" + (f"e{exponent}" if exponent else "")
        return text
    if isinstance(value, str):
        return string(value)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _is_block(value: Any) -> bool:
    """A non-empty mapping or list: written on its own lines."""
    return isinstance(value, Mapping | list | tuple) and len(value) > 0


def _inline(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list | tuple):
        return "[]"
    return scalar(value)


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"YAML keys here are strings, got {key!r}")
            if _is_block(item):
                lines.append(f"{pad}{string(key)}:")
                # A list under a key is indented like its key's children.
                lines += _lines(item, indent + 2)
            else:
                lines.append(f"{pad}{string(key)}: {_inline(item)}")
        return lines
    if isinstance(value, Sequence) and not isinstance(value, str):
        for item in value:
            if _is_block(item):
                nested = _lines(item, indent + 2)
                # The first line of the item goes after the dash.
                lines.append(f"{pad}- {nested[0][indent + 2 :]}")
                lines += nested[1:]
            else:
                lines.append(f"{pad}- {_inline(item)}")
        return lines
    return [pad + scalar(value)]


def dump(document: Mapping[str, Any]) -> str:
    """``document`` as block-style YAML, one trailing newline."""
    if not document:
        return "{}\n"
    return "\n".join(_lines(document, 0)) + "\n"
