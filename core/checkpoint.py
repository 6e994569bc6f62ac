"""Hardened checkpoints: ``model.safetensors`` + ``manifest.json``, and safe loading.

Nothing here unpickles: weights are read from safetensors, or from a torch state dict with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. The
manifest says how to rebuild the model (arch, classes, input shape, normalization); where a
bare weights file comes without one, the architecture is inferred from the tensor names and
shapes.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from catalog import ARCHS, recognize_arch
from catalog.archs import (
    HEAD_WEIGHT,
    STEM_WEIGHT,
    DtypeKind,
    TensorFacts,
    TensorMismatch,
    compare_tensors,
    foreign_weights_message,
)
from core.errors import BulwarkError, ErrorKind
from core.models import FeatureClassifier, build_model

MANIFEST_FORMAT = "bulwark-extractor/1"
WEIGHTS_NAME = "model.safetensors"
EXPORTED_NAME = "model.pt2"  # a torch.export program (core.exported), stored as uploaded
MANIFEST_NAME = "manifest.json"


class CheckpointError(BulwarkError):
    """A checkpoint that cannot be loaded safely or does not describe a supported model."""

    kind = ErrorKind.BAD_CHECKPOINT


@dataclass(frozen=True)
class LoadedExtractor:
    model: FeatureClassifier
    manifest: dict[str, Any]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import numpy
    import safetensors

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
    }


def save_extractor(out_dir: Path, model: FeatureClassifier, manifest: dict[str, Any]) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/manifest.json``; returns the weights path.

    ``manifest`` holds the run's description (defense, config, dataset, Pre. Acc ...); the
    model's own shape facts, the weights' sha256 and library versions are added here.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    full = {
        "format": MANIFEST_FORMAT,
        **manifest,
        **model_facts(model),
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": sha256_file(weights),
        "versions": library_versions(),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return weights


def model_facts(model: FeatureClassifier) -> dict[str, Any]:
    """The manifest fields needed to rebuild ``model``."""
    return {
        "arch": model.arch,
        "in_channels": int(model.normalize.mean.shape[1]),
        "num_classes": model.num_classes,
        "feature_dim": model.feature_dim,
        "normalization": {
            "mean": model.normalize.mean.flatten().tolist(),
            "std": model.normalize.std.flatten().tolist(),
        },
    }


def _looks_like_safetensors(path: Path) -> bool:
    # safetensors: an 8-byte little-endian header length, then a JSON header starting with "{".
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or a torch file read with ``weights_only=True``."""
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    try:
        if path.suffix == ".safetensors" or _looks_like_safetensors(path):
            loaded: object = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch raise several types for bad files
        raise CheckpointError(
            f"{path.name} is neither safetensors nor a weights-only torch state dict: {error}"
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise CheckpointError(f"{path.name} does not hold a flat state dict of tensors")
    return loaded


def infer_facts(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Arch, channels, classes and normalization from a state dict's names and shapes.

    The architecture follows from the tensor names alone by ``catalog.recognize_arch``, the
    rule the API applies to an uploaded safetensors header.
    """
    stem, head = state.get(STEM_WEIGHT), state.get(HEAD_WEIGHT)
    arch = recognize_arch(state.keys())
    if arch is None or stem is None or head is None or stem.ndim != 4 or head.ndim != 2:
        raise CheckpointError(foreign_weights_message(state.keys()))
    facts: dict[str, Any] = {
        "arch": arch,
        "in_channels": int(stem.shape[1]),
        "num_classes": int(head.shape[0]),
        "feature_dim": int(head.shape[1]),
    }
    if "normalize.mean" in state and "normalize.std" in state:
        facts["normalization"] = {
            "mean": state["normalize.mean"].flatten().tolist(),
            "std": state["normalize.std"].flatten().tolist(),
        }
    return facts


def _tensor_facts(tensor: torch.Tensor) -> TensorFacts:
    kind: DtypeKind = "floating" if tensor.is_floating_point() else "integer"
    if tensor.dtype == torch.bool or tensor.is_complex():
        kind = "other"
    return TensorFacts(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), kind)


def load_extractor(path: str | Path, manifest: dict[str, Any] | None = None) -> LoadedExtractor:
    """Rebuild a model from a checkpoint folder, a safetensors file or a weights-only torch file.

    A folder must hold ``model.safetensors`` (its ``manifest.json`` is read when present, and
    the weights' sha256 is checked against it). A file is read alone; ``manifest`` may supply
    the facts that the weights cannot (class names, input size). The model is returned in
    eval mode on the CPU.

    A folder holding ``model.pt2``, or a ``.pt2`` file, is a ``torch.export`` program: it is
    checked and loaded by :func:`core.exported.load_exported_checkpoint`, never unpickled.
    """
    path = Path(path)
    if path.suffix == ".pt2" or (path.is_dir() and (path / EXPORTED_NAME).is_file()):
        from core.exported import load_exported_checkpoint  # it imports this module

        return load_exported_checkpoint(path, manifest)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if manifest is None and (path / MANIFEST_NAME).is_file():
            manifest = json.loads((path / MANIFEST_NAME).read_text())
    else:
        weights = path
    if manifest and manifest.get("weights_sha256"):
        actual = sha256_file(weights) if weights.is_file() else None
        if actual is not None and actual != manifest["weights_sha256"]:
            raise CheckpointError(
                f"{weights} sha256 {actual} does not match the manifest's "
                f"{manifest['weights_sha256']}"
            )
    state = read_weights(weights)
    facts = infer_facts(state)
    merged = {**facts, **(manifest or {})}
    for key in ("arch", "in_channels", "num_classes"):
        if merged[key] != facts[key]:
            raise CheckpointError(
                f"manifest says {key}={merged[key]!r}, weights say {facts[key]!r}"
            )
    # The rule the API applies to a safetensors header, worded the same way; torch's own
    # refusal below stays as the last word on what loads.
    mismatch = compare_tensors(
        ARCHS.get(facts["arch"]).expected_tensors(facts["in_channels"], facts["num_classes"]),
        {name: _tensor_facts(tensor) for name, tensor in state.items()},
    )
    context = (
        f"weights do not fit {facts['arch']} ({facts['in_channels']} input channels, "
        f"{facts['num_classes']} classes)"
    )
    if not mismatch.fits:
        raise CheckpointError(f"{context}: {'; '.join(mismatch.problems())}")
    norm = merged.get("normalization") or {}
    model = build_model(
        facts["arch"],
        in_channels=facts["in_channels"],
        num_classes=facts["num_classes"],
        mean=norm.get("mean"),
        std=norm.get("std"),
    )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensor shapes that do not fit the architecture
        raise CheckpointError(f"{context}: {error}") from error
    missing = tuple(k for k in result.missing_keys if not k.startswith("normalize."))
    unexpected = tuple(result.unexpected_keys)
    if missing or unexpected:
        left = TensorMismatch(missing=missing, unexpected=unexpected)
        raise CheckpointError(f"{context}: {'; '.join(left.problems())}")
    model.eval()
    return LoadedExtractor(model=model, manifest=merged)
