"""The API's small YAML emitter: what it writes reads back, with PyYAML, as what it was given."""

from __future__ import annotations

import pytest

from api import yaml_text

yaml = pytest.importorskip("yaml")

AWKWARD = [
    "",
    " ",
    "plain words",
    "other",
    "yes",
    "No",
    "null",
    "~",
    "true",
    "1.5",
    "007",
    "0x1f",
    "1e3",
    ".inf",
    "- item",
    "key: value",
    "a #comment",
    "#start",
    "trailing ",
    " leading",
    "'single'",
    '"double"',
    "back\\slash",
    "line\nbreak\r\n",
    "tab\there",
    "nul\0bell\x07del\x7f",
    "c1\x85ls\u2028ps\u2029",
    "bom\ufeff",
    "ünïcödé ✓ 🙂",
    "{flow}",
    "[list]",
    "&anchor",
    "*alias",
    "!tag",
    "%directive",
    "@at",
    "`tick`",
    "|",
    ">",
    "---",
    "...",
    "? q",
    "a: ",
    "x:y",
    "=",
]


def test_strings_read_back_as_themselves() -> None:
    for text in AWKWARD:
        assert yaml.safe_load(yaml_text.dump({"s": text})) == {"s": text}, repr(text)
        assert yaml.safe_load(yaml_text.dump({text or "k": [text]})) == {text or "k": [text]}


def test_nested_documents_read_back() -> None:
    document = {
        "license": "other",
        "tags": ["bulwark", "convnet"],
        "empty list": [],
        "empty map": {},
        "numbers": [0, -3, 1.5, 0.1, 1e-05, 1e16, -2.5e-300, 66.7, float("inf"), float("-inf")],
        "flags": [True, False, None],
        "model-index": [
            {
                "name": 'a "model": v1',
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "x"},
                        "metrics": [{"type": "asr", "value": 16.7}, {"value": "fail"}],
                    }
                ],
            }
        ],
        "nested lists": [[1, [2, 3]], [], [{}], [{"a": []}]],
    }
    assert yaml.safe_load(yaml_text.dump(document)) == document
    nan = yaml.safe_load(yaml_text.dump({"n": float("nan")}))["n"]
    assert nan != nan


def test_floats_keep_their_type_and_other_types_are_refused() -> None:
    assert yaml_text.scalar(1e-05) == "1.0e-05" and yaml_text.scalar(2.0) == "2.0"
    with pytest.raises(TypeError):
        yaml_text.dump({"x": object()})
    with pytest.raises(TypeError):
        yaml_text.dump({1: "x"})  # type: ignore[dict-item]
