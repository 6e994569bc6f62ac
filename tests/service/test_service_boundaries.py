"""Service boundaries that are not import layers (those are tests/test_layers.py)."""

from __future__ import annotations

from servicekit import ROOT


def test_only_the_artifact_module_knows_which_store_it_has() -> None:
    """The API and the worker reach artifacts through the ``ArtifactStore`` protocol alone."""
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for folder in ("api", "worker", "common", "bulwark")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != ROOT / "common" / "artifacts.py"
        for name in ("LocalArtifactStore", "local_path(")
        if name in path.read_text()
    ]
    assert offenders == []
