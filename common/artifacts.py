"""The artifact store: checkpoints, uploaded weights and reports' files, by key.

One small interface, :class:`ArtifactStore`, so that an S3-compatible bucket can replace the
local directory: keys are ``/``-separated relative paths (``models/<id>/model.safetensors``).
Writers first fill a staging file and then publish it whole, so a reader never sees a partial
artifact. The API and the worker get their store from :func:`make_artifact_store` and use only
the protocol; no code outside this module knows which store it has.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from common.settings import Settings


class ArtifactNotFoundError(FileNotFoundError):
    """No artifact under that key."""


class ArtifactStore(Protocol):
    def staging_file(self) -> Path:
        """A fresh local path to write an artifact into before :meth:`publish`."""
        ...

    def publish(self, key: str, staged: Path) -> None:
        """Move the finished file ``staged`` to ``key`` (atomic for readers)."""
        ...

    def put_file(self, key: str, source: Path) -> None:
        """Copy the local file ``source`` to ``key``."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A binary reader of the artifact ``key``."""
        ...

    def fetch(self, key: str, destination: Path) -> None:
        """Copy the artifact ``key`` to the local file ``destination``."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        ...


class LocalArtifactStore:
    """Artifacts as files under ``root``; staging files under ``root/.staging``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._staging = self.root / ".staging"

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not parts or any(p in ("", ".", "..") for p in parts) or key.startswith("/"):
            raise ValueError(f"bad artifact key {key!r}")
        return self.root.joinpath(*parts)

    def staging_file(self) -> Path:
        self._staging.mkdir(parents=True, exist_ok=True)
        return self._staging / uuid.uuid4().hex

    def publish(self, key: str, staged: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)

    def put_file(self, key: str, source: Path) -> None:
        staged = self.staging_file()
        shutil.copyfile(source, staged)
        self.publish(key, staged)

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise ArtifactNotFoundError(key) from None

    def fetch(self, key: str, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with (
            self.open(key) as source,
            tempfile.NamedTemporaryFile(dir=destination.parent, delete=False) as partial,
        ):
            shutil.copyfileobj(source, partial)
        os.replace(partial.name, destination)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ArtifactNotFoundError(key) from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def make_artifact_store(settings: Settings) -> ArtifactStore:
    """The store the settings name: a local directory (``BULWARK_ARTIFACT_DIR``, by default
    ``<data_dir>/artifacts``). An S3-compatible bucket is one more class and a branch here."""
    return LocalArtifactStore(settings.resolved_artifact_dir)


def model_weights_key(model_id: uuid.UUID | str) -> str:
    return f"models/{model_id}/model.safetensors"


def import_upload_key(job_id: uuid.UUID | str) -> str:
    """Where a torch ``.pt`` upload waits for the worker that converts it to safetensors."""
    return f"imports/{job_id}/upload.pt"


def model_manifest_key(model_id: uuid.UUID | str) -> str:
    return f"models/{model_id}/manifest.json"


def model_program_key(model_id: uuid.UUID | str) -> str:
    """A stored ``torch.export`` program (``core.exported``), kept exactly as uploaded."""
    return f"models/{model_id}/model.pt2"


def dataset_upload_key(dataset_id: uuid.UUID | str) -> str:
    """Where a tenant's dataset upload waits for the dataset job that reads it."""
    return f"datasets/{dataset_id}/upload"


def dataset_data_key(dataset_id: uuid.UUID | str) -> str:
    """A ready tenant dataset: the canonical npz its dataset job wrote."""
    return f"datasets/{dataset_id}/data.npz"
