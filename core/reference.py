"""The undefended reference of an audit: the same architecture trained on the same data
without a defense, so the audited model's ASR can be read against what the same attacks do to
an undefended model on the same instances (``core.audit``, ``AuditConfig.reference``).

An absolute ASR depends on the protocol (pairs, pre-training data, budgets) as much as on the
model; the reference, audited on identical instances, is what makes the number mean something.
A tenant may name a reference model; otherwise :func:`auto_reference_config` derives the
pre-training run of one (``defense="none"``) from the audited model's manifest and the audit,
and :func:`reference_key` names it so that a cache (a local folder for the CLI, the artifact
store for the service) trains it once per architecture, dataset and recipe.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from catalog import ARCHS
from core.config import AuditConfig, PretrainConfig, pretrain_config
from core.errors import BulwarkError, ErrorKind
from core.progress import ProgressCallback, ignore_progress

# Fields of a pre-training config that do not change the weights it produces.
_NOT_IDENTITY = frozenset({"data_dir", "device"})


class NoAutoReferenceError(BulwarkError):
    """Bulwark cannot pre-train a reference for this audit; the message says why and what to
    do instead (name a reference model)."""

    kind = ErrorKind.INVALID_CONFIG


def auto_reference_config(manifest: dict[str, Any], audit: AuditConfig) -> PretrainConfig:
    """The pre-training run of the audited model's undefended twin.

    A model Bulwark pre-trained carries its run's config in its manifest: the reference is that
    run with ``defense="none"`` (same architecture, recipe, epochs, split and seed). Another
    model of a catalog architecture gets the default recipe of its architecture without a
    defense. Either way it trains on the audit's dataset and split, whose pre-training images
    are disjoint from the audit's re-training images and base pool.

    Raises :class:`NoAutoReferenceError` for a model of no catalog architecture (a
    ``torch.export`` program: Bulwark has no class to train) and for a split without
    pre-training images.
    """
    arch = manifest.get("arch")
    if arch not in ARCHS:
        raise NoAutoReferenceError(
            f"no automatic reference for a model of architecture {arch!r} (a torch.export "
            "program has no class Bulwark can train): name an undefended model of the same "
            "architecture as the reference"
        )
    split = audit.resolved_split
    if split.pretrain == 0:
        raise NoAutoReferenceError(
            "no automatic reference: the audit's split has no pre-training images "
            "(split.pretrain is 0); name a reference model, or give a split with pre-training "
            "images"
        )
    trained = manifest.get("config") if isinstance(manifest.get("config"), dict) else None
    values: dict[str, Any] = {
        "dataset": audit.dataset,
        "data_dir": audit.data_dir,
        "device": audit.device,
        "arch": arch,
        "split": split,
        "precision": audit.precision,
    }
    try:
        if trained is not None and trained.get("arch") == arch:
            kept = {k: v for k, v in trained.items() if k not in ("dataset", "data_dir", "device")}
            return PretrainConfig.model_validate({**kept, **values, "defense": "none"})
        return pretrain_config(defense="none", seed=audit.seed, **values)
    except ValidationError as error:
        raise NoAutoReferenceError(f"cannot derive a reference pre-training run: {error}") from None


def reference_key(config: PretrainConfig, data_identity: str) -> str:
    """A stable name of the reference ``config`` trains on the data ``data_identity`` names
    (a built-in dataset's name, or a tenant dataset's id and sha256)."""
    identity = {
        "config": config.model_dump(mode="json", exclude=set(_NOT_IDENTITY)),
        "data": data_identity,
    }
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def ensure_reference(
    config: PretrainConfig,
    folder: Path,
    *,
    progress: ProgressCallback = ignore_progress,
) -> Path:
    """The reference checkpoint in ``folder``, pre-training it there first if it is absent.

    The run trains in a scratch folder beside ``folder`` and is renamed into place when done,
    so an interrupted run never leaves a half-written reference that a later audit would
    read.
    """
    from core.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
    from core.train import pretrain

    if (folder / WEIGHTS_NAME).is_file() and (folder / MANIFEST_NAME).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        pretrain(config, out_dir=scratch / "checkpoint", work_dir=scratch, progress=progress)
        if not folder.exists():
            (scratch / "checkpoint").rename(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder
