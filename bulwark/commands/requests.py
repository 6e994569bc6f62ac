"""What ``pretrain`` and ``audit`` share: dataset arguments, ``--set`` values, usage errors.

Both commands build the same request models the HTTP API takes (``catalog.requests``) and
resolve them with the same functions (``common.specs``), so a CLI run and an API job with the
same choices get the same config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from catalog import DATASETS


def dataset_argument(text: str) -> tuple[str, str | None]:
    """``--dataset``: a catalog name, or a path (name, data_dir).

    A folder is an image folder; a file is read by the catalog entry whose ``data_file``
    suffix it has (``data.npz`` -> ``npz``, with the file as its data_dir).
    """
    if text in DATASETS:
        return text, None
    path = Path(text)
    if path.is_dir():
        return "image-folder", text
    files = {spec.data_file: spec.name for spec in DATASETS.entries() if spec.data_file}
    if path.is_file() and path.suffix.lower() in files:
        return files[path.suffix.lower()], text
    raise argparse.ArgumentTypeError(
        f"{DATASETS.unknown_message(text)}; or give the path of an image folder with train/ "
        f"and test/ sub-folders, or of a {' or '.join(sorted(files))} file"
    )


def split_argument(text: str) -> dict[str, int]:
    """``--split PRETRAIN:RETRAIN:POOL`` -> the split's fields."""
    try:
        pretrain, retrain, pool = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected PRETRAIN:RETRAIN:POOL integers, got {text!r}"
        ) from None
    return {"pretrain": pretrain, "retrain": retrain, "pool": pool}


def set_values(pairs: list[str], flag: str = "--set") -> dict[str, Any]:
    """``FIELD=VALUE`` pairs; a VALUE that parses as JSON is taken as such, else as a string."""
    values: dict[str, Any] = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep or not field:
            raise ValueError(f"{flag}: expected FIELD=VALUE, got {pair!r}")
        try:
            values[field.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            values[field.replace("-", "_")] = value
    return values


def given(**values: Any) -> dict[str, Any]:
    """The values the user gave (argparse leaves the others None)."""
    return {name: value for name, value in values.items() if value is not None}


def report_errors(command: str, errors: list[dict[str, Any]], flags: set[str]) -> int:
    """One line per invalid field, named as the user wrote it; the usage exit code, 2.

    ``flags`` are the command's own option names (``--alpha``); any other field was given
    with ``--set``.
    """
    for error in errors:
        loc = [str(part) for part in error["loc"] if part not in ("body", "overrides")]
        field = loc[0] if loc else ""
        flag = f"--{field.replace('_', '-')}"
        where = flag if flag in flags else f"--set {'.'.join(loc)}" if loc else "arguments"
        message = str(error["msg"]).removeprefix("Value error, ")
        print(f"bulwark {command}: {where}: {message}", file=sys.stderr)
    return 2


def data_location_problem(dataset: str, data_dir: str | None) -> str | None:
    """Why ``dataset``'s files cannot be where the run would read them, or None: checked
    before any work starts (the rules of ``core.datasets``: a folder, or for a one-file entry
    such as ``npz`` a file; entries bundled with a package need none)."""
    spec = DATASETS.get(dataset)
    where = data_dir if data_dir is not None else spec.default_dir
    if not spec.needs_files:
        return None
    if where is None:
        kind = f"the path of its {spec.data_file} file" if spec.data_file else "its folder"
        return f"--data-dir: dataset {dataset!r} needs {kind}"
    path = Path(where)
    if spec.data_file is not None and not path.is_file():
        return f"--data-dir: no {spec.data_file} file at {where} for dataset {dataset!r}"
    if spec.data_file is None and not path.is_dir():
        return f"--data-dir: no folder {where} for dataset {dataset!r}"
    return None


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}
