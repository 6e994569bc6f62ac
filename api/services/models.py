"""Uploaded and pre-trained models: registering uploads, listing, weights and model cards."""

from __future__ import annotations

import json
import math
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api import yaml_text
from api.errors import (
    ConflictError,
    InvalidFieldError,
    NotFoundError,
    UnsupportedUploadError,
    UploadTooLargeError,
)
from api.onnx_check import (
    SNIFF_BYTES,
    OnnxContainerError,
    check_onnx_file,
    looks_like_onnx,
    named_onnx,
)
from api.ratelimit import check_stored_bytes
from api.safetensors_check import (
    SafetensorsError,
    infer_model_facts,
    looks_like_pickle,
    read_header,
)
from api.schemas import ModelPublic
from api.services import jobs as job_service
from api.services.jobs import SortOrder
from api.uploads import ReceivedUpload
from catalog import ARCHS
from catalog.requests import NAME_MAX, name_problem
from common.artifacts import (
    ArtifactStore,
    import_upload_key,
    model_manifest_key,
    model_program_key,
    model_weights_key,
)
from common.models import Job, JobStatus, ModelSource, Report, StoredModel, Tenant, utcnow
from common.settings import Settings
from common.specs import ImportJobSpec
from core.archives import ArchiveError, ArchiveLimits, inspect_archive
from core.report import AuditReport, percent, read_report, render_asr_table
from core.verdict import BOUNDS, policy_source

# Form integers (input_shape) must fit the Integer columns they end in.
MAX_FORM_INT = 2**31 - 1
TORCH_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive holding data.pkl
ONNX_UNSUPPORTED = (
    "ONNX uploads are not imported by this deployment: its workers have no ONNX converter "
    "(the operator sets BULWARK_ONNX_ENABLED where the workers have the `onnx` extra); export "
    "the model with torch.export and upload the .pt2 (docs/hub.md), or upload its weights as "
    "safetensors if it is one of Bulwark's architectures"
)
CONVERT_HINT = (
    'convert it where you trust the file: python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('model.pt', weights_only=True), 'model.safetensors')\""
)


def model_public(model: StoredModel) -> ModelPublic:
    return ModelPublic.model_validate(
        {
            **{c: getattr(model, c) for c in ModelPublic.model_fields if hasattr(model, c)},
            "weights_url": f"/v1/models/{model.id}/weights",
            "card_url": f"/v1/models/{model.id}/card",
        }
    )


def register_upload(
    *,
    session: Session,
    store: ArtifactStore,
    celery: Celery,
    settings: Settings,
    tenant: Tenant,
    upload: ReceivedUpload,
) -> StoredModel | Job:
    """Check the uploaded weights and metadata, publish the file, write the row.

    A safetensors file is checked here, without torch (every tensor's name, shape and dtype
    against the architecture, so a 201 means the model loads), and becomes a model at once. A
    torch ``torch.save`` file (a zip holding a pickle) is never read here: it is stored as it is and
    an import job converts it on a worker, which reads it with ``torch.load(weights_only=True)``
    and checks it against the form; the job is returned. An ``.onnx`` file (by name, and by its
    first bytes: ``api.onnx_check``) answers 415 pointing to torch.export, unless the
    deployment converts ONNX (``settings.onnx_enabled``): then its top-level fields are checked
    (``check_onnx_file``) and an import job converts it on a worker. A
    ``torch.export.save`` archive (``.pt2``: a zip told from torch.save's by its member names,
    read from its central directory only) is queued as an import job whose worker checks the
    program (``core.exported``) and keeps it untouched. A
    bare pickle is refused. Nothing is kept for a rejected upload.
    """
    staged = upload.staged
    try:
        if staged is None or upload.size == 0:
            raise InvalidFieldError.at(("body", "file"), "a non-empty safetensors file is required")
        check_stored_bytes(session, settings, tenant, upload.size)  # 413 past the quota
        with staged.open("rb") as handle:
            head = handle.read(SNIFF_BYTES)
        if named_onnx(upload.filename):
            if not looks_like_onnx(head, upload.size):
                raise InvalidFieldError.at(
                    ("body", "file"),
                    "the file is named .onnx but is not an ONNX model (a protobuf ModelProto "
                    "starting with its ir_version)",
                )
            # Only workers with the `onnx` extra convert (core.onnx_import needs onnx2torch
            # and a torchvision that imports): elsewhere a queued job could never succeed.
            if not settings.onnx_enabled:
                raise UnsupportedUploadError(ONNX_UNSUPPORTED)
            try:
                check_onnx_file(staged)
            except OnnxContainerError as error:
                raise InvalidFieldError.at(
                    ("body", "file"), f"the ONNX file is refused: {error}"
                ) from None
            return _queue_torch_import(
                session=session,
                store=store,
                celery=celery,
                settings=settings,
                tenant=tenant,
                upload=upload,
                format="onnx",
            )
        if head.startswith(TORCH_ZIP_MAGIC):
            return _queue_torch_import(
                session=session,
                store=store,
                celery=celery,
                settings=settings,
                tenant=tenant,
                upload=upload,
                format=_torch_zip_format(staged, settings),
            )
        if looks_like_pickle(head):
            raise UnsupportedUploadError(
                "the file is a pickle (torch.save format); only safetensors is accepted "
                f"because pickles can run code when loaded; {CONVERT_HINT}"
            )
        try:
            tensors, _ = read_header(staged)
            facts = infer_model_facts(tensors)
        except SafetensorsError as error:  # one 422, each problem on the file field
            raise InvalidFieldError(
                [{"loc": ("body", "file"), "msg": problem} for problem in error.problems]
            ) from None
        manifest = _upload_manifest(upload.fields, facts)
        model = StoredModel(
            id=uuid.uuid4(),
            tenant_id=tenant.id,
            name=_name_field(upload.fields) or upload.filename or "uploaded model",
            source=ModelSource.UPLOAD,
            arch=facts["arch"],
            num_classes=facts["num_classes"],
            in_channels=facts["in_channels"],
            feature_dim=facts["feature_dim"],
            manifest=manifest,
            sha256=upload.sha256,
            size_bytes=upload.size,
            weights_key="",
        )
        model.weights_key = model_weights_key(model.id)
        session.add(model)
        session.flush()
        store.publish(model.weights_key, staged)
        try:
            session.commit()
        except BaseException:
            store.delete(model.weights_key)
            raise
        return model
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)


def _queue_torch_import(
    *,
    session: Session,
    store: ArtifactStore,
    celery: Celery,
    settings: Settings,
    tenant: Tenant,
    upload: ReceivedUpload,
    format: Literal["torch-state-dict", "export", "onnx"] = "torch-state-dict",
) -> Job:
    """Check the form (the file is checked by the worker), store the file, queue the job.

    A torch state dict names its ``arch``. A ``torch.export`` program and an ONNX graph have
    none; their ``output`` is features (default: no head, every audit re-trains one) or logits
    (the final linear layer is the head).
    """
    fields = upload.fields
    arch = _arch_field(fields) if format == "torch-state-dict" else None
    output: Literal["logits", "features"] = "logits"
    if format in ("export", "onnx"):
        output = _output_field(fields, default="features")
    input_shape = _int_list(fields, "input_shape", required=True)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise InvalidFieldError.at(
            ("body", "input_shape"),
            f"input_shape must be [channels, height, width], got {input_shape}",
        )
    classes = _json_field(fields, "classes")
    if classes is not None and not (
        isinstance(classes, list)
        and all(isinstance(c, str) and name_problem(c) is None for c in classes)
    ):
        raise InvalidFieldError.at(
            ("body", "classes"),
            f"classes must be a JSON list of names (each at most {NAME_MAX} characters, "
            "no control characters)",
        )
    normalization = _normalization_field(fields, channels=input_shape[0]) or {}
    assert upload.staged is not None
    if format == "torch-state-dict" and not zipfile.is_zipfile(upload.staged):
        # torch.save writes a standard zip: one whose central directory cannot be read here
        # had no member sizes checked, and torch.load must not be the first to inflate it.
        raise InvalidFieldError.at(
            ("body", "file"),
            "the file starts like a zip but its central directory cannot be read; send the "
            "file as torch.save wrote it",
        )
    job_id = uuid.uuid4()
    spec = ImportJobSpec(
        upload_key=import_upload_key(job_id),
        filename=upload.filename,
        sha256=upload.sha256,
        name=_name_field(fields),
        format=format,
        arch=arch,
        input_shape=input_shape,
        classes=classes,
        mean=normalization.get("mean"),
        std=normalization.get("std"),
        output=output,
    )
    assert upload.staged is not None
    store.publish(spec.upload_key, upload.staged)
    try:
        return job_service.submit_import(
            session=session,
            celery=celery,
            settings=settings,
            tenant=tenant,
            job_id=job_id,
            spec=spec,
        )
    except BaseException:
        store.delete(spec.upload_key)
        raise


# The member names that tell the two torch zips apart (torch.export.pt2_archive and
# torch.serialization write them under one root folder).
EXPORT_MARKERS = ("archive_format", "models/model.json")
MAX_ZIP_MEMBERS = 4096


def _torch_zip_format(staged: Path, settings: Settings) -> Literal["torch-state-dict", "export"]:
    """Which torch zip the upload is, from its central directory alone (nothing inflated).

    A ``torch.export.save`` archive holds ``<root>/archive_format`` and
    ``<root>/models/model.json``; a ``torch.save`` file holds ``<root>/data.pkl``. A zip with
    a name that could escape (absolute, ``..``), a link, more than ``MAX_ZIP_MEMBERS`` members
    or a zip bomb member is refused (422), one declaring more inflated bytes than the upload
    limit too (413), before anything is stored. A file the zip reader cannot parse is refused
    (422, after the form's fields): ``torch.load`` never sees an archive whose sizes were not
    checked.
    """
    if not zipfile.is_zipfile(staged):  # refused once the form is checked (_queue_torch_import)
        return "torch-state-dict"
    limit = settings.max_upload_bytes
    try:
        # The declared total may pass the upload limit here: that answers 413 below.
        listing = inspect_archive(
            staged, ArchiveLimits(max_members=MAX_ZIP_MEMBERS, max_total_bytes=64 * limit)
        )
    except ArchiveError as error:
        raise InvalidFieldError.at(
            ("body", "file"), f"the zip archive is refused: {error}"
        ) from None
    if listing.total_bytes > limit:
        raise UploadTooLargeError(
            f"the zip's members declare {listing.total_bytes} bytes once inflated; the upload "
            f"limit is {limit} bytes",
            limit_bytes=limit,
        )
    names = {member.name.partition("/")[2] for member in listing.files}
    if any(marker in names for marker in EXPORT_MARKERS):
        return "export"
    if "data.pkl" in names:
        return "torch-state-dict"
    raise InvalidFieldError.at(
        ("body", "file"),
        "a zip that is neither a torch.export.save archive (<root>/archive_format, "
        "<root>/models/model.json) nor a torch.save file (<root>/data.pkl)",
    )


def _upload_manifest(fields: dict[str, str], facts: dict[str, Any]) -> dict[str, Any]:
    """The manifest of an upload from its form fields, checked against the weights."""
    arch = _arch_field(fields)
    if arch != facts["arch"]:
        raise InvalidFieldError.at(
            ("body", "arch"), f"arch is {arch!r} but the weights are a {facts['arch']}"
        )
    input_shape = _int_list(fields, "input_shape", required=True)
    if len(input_shape) != 3 or input_shape[0] != facts["in_channels"] or min(input_shape) < 1:
        raise InvalidFieldError.at(
            ("body", "input_shape"),
            f"input_shape must be [channels, height, width] with {facts['in_channels']} channels "
            f"(as the weights have), got {input_shape}",
        )
    manifest: dict[str, Any] = {
        "kind": "uploaded-extractor",
        "arch": arch,
        "in_channels": facts["in_channels"],
        "num_classes": facts["num_classes"],
        "feature_dim": facts["feature_dim"],
        "input_shape": input_shape,
    }
    classes = _json_field(fields, "classes")
    if classes is not None:
        if not (
            isinstance(classes, list)
            and all(isinstance(c, str) and name_problem(c) is None for c in classes)
            and len(classes) == facts["num_classes"]
        ):
            raise InvalidFieldError.at(
                ("body", "classes"),
                f"classes must be a JSON list of {facts['num_classes']} names (the head's size)",
            )
        manifest["classes"] = classes
    normalization = _normalization_field(fields, channels=facts["in_channels"])
    if normalization is not None:
        manifest["normalization"] = normalization
    elif not facts["has_normalization"]:
        raise InvalidFieldError.at(
            ("body", "mean"), "the weights hold no normalize.mean/std: give mean and std"
        )
    return manifest


def _output_field(
    fields: dict[str, str], default: Literal["logits", "features"] = "logits"
) -> Literal["logits", "features"]:
    output = fields.get("output", "").strip() or default
    if output not in ("logits", "features"):
        raise InvalidFieldError.at(
            ("body", "output"),
            f"output must be logits (the graph ends in its linear head) or features, "
            f"got {output!r}",
        )
    return "logits" if output == "logits" else "features"


def _arch_field(fields: dict[str, str]) -> str:
    arch = fields.get("arch", "").strip()
    if arch not in ARCHS:
        raise InvalidFieldError.at(("body", "arch"), ARCHS.unknown_message(arch))
    return arch


def _normalization_field(fields: dict[str, str], *, channels: int) -> dict[str, list] | None:
    """``{"mean": [...], "std": [...]}`` from the form, one value per channel; None if absent."""
    mean, std = _float_list(fields, "mean"), _float_list(fields, "std")
    if mean is None or std is None:
        if (mean is None) != (std is None):
            raise InvalidFieldError.at(
                ("body", "mean" if mean is None else "std"), "give mean and std together"
            )
        return None
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != channels or (name == "std" and min(values) <= 0):
            raise InvalidFieldError.at(
                ("body", name),
                f"{name} needs {channels} values" + (", all > 0" if name == "std" else ""),
            )
    return {"mean": mean, "std": std}


def _name_field(fields: dict[str, str]) -> str | None:
    """The form's ``name``, checked as its column holds it; None if not given."""
    name = fields.get("name", "").strip()
    if name and (problem := name_problem(name)) is not None:
        raise InvalidFieldError.at(("body", "name"), problem)
    return name or None


def _json_field(fields: dict[str, str], name: str) -> Any:
    raw = fields.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise InvalidFieldError.at(("body", name), f"not JSON: {error}") from None


def _numbers(fields: dict[str, str], name: str) -> list[Any] | None:
    raw = fields.get(name)
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    values = _json_field(fields, name) if text.startswith("[") else text.split(",")
    if not isinstance(values, list) or not values:
        raise InvalidFieldError.at(("body", name), "expected a list like [3, 32, 32] or 3,32,32")
    return values


def _int_list(fields: dict[str, str], name: str, *, required: bool = False) -> list[int]:
    values = _numbers(fields, name)
    if values is None:
        if required:
            raise InvalidFieldError.at(("body", name), "field required, e.g. 3,32,32")
        return []
    try:
        numbers = [int(str(v).strip()) for v in values]
    except ValueError:
        raise InvalidFieldError.at(("body", name), f"expected integers, got {values}") from None
    if any(abs(number) > MAX_FORM_INT for number in numbers):
        raise InvalidFieldError.at(("body", name), f"each value must be at most {MAX_FORM_INT}")
    return numbers


def _float_list(fields: dict[str, str], name: str) -> list[float] | None:
    values = _numbers(fields, name)
    if values is None:
        return None
    try:
        numbers = [float(str(v).strip()) for v in values]
    except ValueError:
        raise InvalidFieldError.at(("body", name), f"expected numbers, got {values}") from None
    # float() reads "nan" and "inf"; neither normalizes an image.
    if not all(math.isfinite(number) for number in numbers):
        raise InvalidFieldError.at(("body", name), f"expected finite numbers, got {values}")
    return numbers


def get_model(*, session: Session, tenant: Tenant, model_id: uuid.UUID) -> StoredModel:
    """The tenant's model; a deleted one, another tenant's or a missing one is a 404."""
    model = session.get(StoredModel, model_id)
    if model is None or model.tenant_id != tenant.id or model.deleted_at is not None:
        raise NotFoundError(f"no model {model_id}")
    return model


def list_models(
    *,
    session: Session,
    tenant: Tenant,
    limit: int,
    offset: int,
    sha256: str | None = None,
    name: str | None = None,
    order: SortOrder = "desc",
) -> tuple[list[StoredModel], int]:
    """The tenant's models, newest first (``order="asc"``: oldest first), optionally only
    those with this ``sha256`` (of the file as uploaded or produced) or this exact ``name``."""
    query = select(StoredModel).where(
        StoredModel.tenant_id == tenant.id, StoredModel.deleted_at.is_(None)
    )
    if sha256 is not None:
        query = query.where(StoredModel.sha256 == sha256.lower())
    if name is not None:
        query = query.where(StoredModel.name == name)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    created = StoredModel.created_at.asc() if order == "asc" else StoredModel.created_at.desc()
    models = session.scalars(
        query.order_by(created, StoredModel.id).limit(limit).offset(offset)
    ).all()
    return list(models), total


def delete_model(
    *, session: Session, store: ArtifactStore, tenant: Tenant, model_id: uuid.UUID
) -> None:
    """Remove the model's files (weights or program, manifest) and tombstone its row;
    deleting it again changes nothing.

    Refused (409) while a queued or running job reads it (an audit of it, or one that names
    it as the reference). Finished jobs and reports keep naming its id.
    """
    model = session.get(StoredModel, model_id, with_for_update=True)
    if model is None or model.tenant_id != tenant.id:
        raise NotFoundError(f"no model {model_id}")
    if model.deleted_at is not None:
        return
    readers = session.scalars(
        select(Job.id).where(
            Job.tenant_id == tenant.id,
            Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)),
            (Job.model_id == model.id) | (Job.spec["reference"].as_string() == str(model.id)),
        )
    ).all()
    if readers:
        session.rollback()
        raise ConflictError(
            f"model {model.id} is read by {len(readers)} queued or running job(s); cancel "
            "them or wait until they finish",
            job_ids=[str(job_id) for job_id in readers],
        )
    model.deleted_at = utcnow()
    session.commit()
    for key in {
        model.weights_key,
        model_weights_key(model.id),
        model_program_key(model.id),
        model_manifest_key(model.id),
    }:
        store.delete(key)


WEIGHTS_CHUNK_BYTES = 1 << 20


def weights_stream(*, store: ArtifactStore, model: StoredModel) -> tuple[Iterator[bytes], int]:
    """The model's weights as chunks read through the store, and their size in bytes.

    The file is opened here, so a missing artifact fails before a response starts; the
    reader is closed once the last chunk is sent (or the client goes away).
    """
    size = store.size(model.weights_key)
    reader = store.open(model.weights_key)

    def chunks() -> Iterator[bytes]:
        with reader:
            while block := reader.read(WEIGHTS_CHUNK_BYTES):
                yield block

    return chunks(), size


CARD_LICENSE = "other"  # where the model's manifest names none
CARD_TAGS = ("bulwark", "clean-label-poisoning-audit")
CARD_TASK = {"type": "image-classification", "name": "clean-label poisoning audit"}
PROTOCOL_CAVEAT = (
    "Absolute ASR depends on the protocol (the class pairs, the targets drawn, the model's "
    "pre-training data and the re-training data): read it next to a reference audit of an "
    "undefended model of the same architecture on the same data and instances."
)
NO_REFERENCE = "This card carries no reference audit."
SOME_REFERENCES = "Audits below without a reference say why they have none."
WITH_REFERENCES = (
    "Each audit below carries one: the undefended reference, audited on the same instances, "
    "and the difference of the two ASRs with its 95% interval."
)


def model_card(*, session: Session, model: StoredModel) -> str:
    """A Hugging Face model card: YAML front matter (license, tags, datasets, ``model-index``
    with one entry per audit) and a markdown body (provenance, recipe, every audit's protocol,
    ASR table and verdict)."""
    reports = [
        (row, read_report(row.body, newer_fields="ignore"))
        for row in session.scalars(
            select(Report)
            .join(Job, Job.id == Report.job_id)
            .where(Report.model_id == model.id, Job.deleted_at.is_(None))
            .order_by(Report.created_at)
        ).all()
    ]
    front = yaml_text.dump(_card_metadata(model, [r for _, r in reports]))
    return f"---\n{front}---\n\n{_card_body(model, reports)}"


def _defense(model: StoredModel, reports: list[AuditReport]) -> str | None:
    manifest = model.manifest
    config = manifest.get("config") or {}
    for defense in (manifest.get("defense"), config.get("defense")):
        if defense:
            return str(defense)
    return next((r.model.defense for r in reports if r.model.defense), None)


def _card_metadata(model: StoredModel, reports: list[AuditReport]) -> dict[str, Any]:
    manifest = model.manifest
    config = manifest.get("config") or {}
    tags = [*CARD_TAGS, model.arch]
    defense = _defense(model, reports)
    if defense:
        tags.append("undefended" if defense == "none" else defense)
    datasets: list[str] = []
    for name in (
        manifest.get("dataset"),
        config.get("dataset"),
        *(r.dataset.name for r in reports),
    ):
        if name and str(name) not in datasets:
            datasets.append(str(name))
    metadata: dict[str, Any] = {
        "license": str(manifest.get("license") or CARD_LICENSE),
        "tags": list(dict.fromkeys(tags)),
    }
    if datasets:
        metadata["datasets"] = datasets
    if reports:
        metadata["model-index"] = [
            {"name": model.name, "results": [_card_result(report)]} for report in reports
        ]
    return metadata


def _rate(value: float, digits: int = 1) -> float:
    """A rate in [0, 1] as a percent, rounded."""
    return round(100 * value, digits)


def _card_result(report: AuditReport) -> dict[str, Any]:
    metrics: list[dict[str, Any]] = []
    for name, result in report.attacks.items():
        label = name.upper()
        # The headline: ASR among the targets the clean model classifies correctly, where the
        # report has it (the same number the body's table leads with).
        metrics.append(
            {
                "type": "attack-success-rate",
                "name": f"{label} ASR",
                "value": _rate(result.headline.rate),
            }
        )
        if result.asr_correct_targets is not None:
            metrics.append(
                {
                    "type": "attack-success-rate",
                    "name": f"{label} ASR over all instances",
                    "value": _rate(result.asr),
                }
            )
        comparison = report.comparison.get(name)
        if comparison is not None:
            low, high = comparison.difference95
            metrics += [
                {
                    "type": "attack-success-rate",
                    "name": f"{label} reference ASR (undefended, same instances)",
                    "value": _rate(comparison.reference.rate),
                },
                {
                    "type": "attack-success-rate-difference",
                    "name": f"{label} ASR minus reference, percentage points (95% CI "
                    f"{_rate(low)} to {_rate(high)})",
                    "value": _rate(comparison.difference),
                },
            ]
        metrics += [
            {
                "type": "baseline-success-rate",
                "name": f"{label} baseline (unperturbed bases)",
                "value": _rate(result.headline_baseline.rate),
            },
            {
                "type": "accuracy",
                "name": f"{label} Re. Acc",
                "value": _rate(result.re_acc.mean, 2),
            },
        ]
    if report.pre_acc is not None:
        metrics.append({"type": "accuracy", "name": "Pre. Acc", "value": _rate(report.pre_acc, 2)})
    if report.verdict is not None:
        metrics.append(
            {"type": "verdict", "name": "Policy verdict", "value": report.verdict.outcome}
        )
    return {
        "task": dict(CARD_TASK),
        "dataset": {"name": report.dataset.name, "type": report.dataset.name},
        "metrics": metrics,
    }


def _card_body(model: StoredModel, reports: list[tuple[Report, AuditReport]]) -> str:
    manifest = model.manifest
    lines = [
        f"# {model.name}",
        "",
        f"- id: `{model.id}`",
        f"- source: {model.source.value}",
        f"- architecture: {model.arch} ({model.in_channels} input channels, "
        f"{model.feature_dim}-d features, {model.num_classes} classes)",
        f"- input shape: {manifest.get('input_shape')}",
        f"- weights: `{PurePosixPath(model.weights_key).name}`, sha256 `{model.sha256}`, "
        f"{model.size_bytes} bytes",
    ]
    if manifest.get("classes"):
        lines.append(f"- classes: {', '.join(map(str, manifest['classes']))}")
    if manifest.get("normalization"):
        lines.append(f"- normalization: {manifest['normalization']}")
    config = manifest.get("config")
    if config:
        lines += [
            "",
            "## Training recipe",
            "",
            f"- dataset: {config.get('dataset')}, defense: {config.get('defense')}, "
            f"recipe: {config.get('recipe')}, seed: {config.get('seed')}",
            f"- epochs: {config.get('epochs')}, lr: {config.get('lr')} (x{config.get('lr_gamma')} "
            f"after epochs {config.get('milestones')}), batch size: {config.get('batch_size')}",
        ]
        if config.get("defense") in ("at", "at-pcl"):
            lines.append(
                f"- PGD adversarial training: epsilon {config.get('epsilon'):.4f}, "
                f"{config.get('pgd_steps')} steps, feature term {config.get('feature_term')}"
            )
        if config.get("defense") in ("pcl", "at-pcl"):
            lines.append(
                f"- Prototype Conformity Loss: alpha {config.get('alpha')}, "
                f"after {config.get('warmup_epochs')} warm-up epochs"
            )
        if manifest.get("pre_acc") is not None:
            lines.append(f"- Pre. Acc (clean test accuracy): {manifest['pre_acc']:.4f}")
    lines += ["", "## Clean-label poisoning audit", ""]
    if not reports:
        lines.append("Not audited yet: `POST /v1/jobs/audit` with this model id.")
    else:
        with_reference = [report.reference is not None for _, report in reports]
        if all(with_reference):
            caveat = f"{PROTOCOL_CAVEAT} {WITH_REFERENCES}"
        elif any(with_reference):
            caveat = f"{PROTOCOL_CAVEAT} {SOME_REFERENCES}"
        else:
            caveat = f"{PROTOCOL_CAVEAT} {NO_REFERENCE}"
        lines += [caveat, ""]
    for row, report in reports:
        lines += [f"### Audit job `{row.job_id}` ({row.created_at:%Y-%m-%d})", ""]
        lines += _audit_protocol(report)
        lines += ["", render_asr_table(report, markdown=True), ""]
        if report.verdict is not None:
            verdict = report.verdict
            source = policy_source(verdict)
            lines += [
                f"**Verdict: {verdict.outcome.upper()}** ({source or 'policy'}, confidence "
                f"{100 * verdict.confidence:g}%, {BOUNDS}). {verdict.reason}",
                "",
            ]
            if verdict.policy is not None:
                # The policy itself, so the card says what the verdict was measured against.
                policy = verdict.policy.model_dump_json(exclude_none=True)
                lines += [f"Policy: `{policy}`", ""]
    return "\n".join(lines).rstrip() + "\n"


def _audit_protocol(report: AuditReport) -> list[str]:
    """The protocol an audit ran, from its resolved config and facts."""
    config = report.config
    dataset = report.dataset
    delta = config.get("delta")
    delta_text = "?" if delta is None else f"{delta:.4f} ({255 * delta:.1f}/255)"
    if report.pair_choices:  # /3: the pairs the audit chose, and what chose each
        pair_text = ", ".join(
            f"{_class_name(dataset.classes, c.target_class)} -> "
            f"{_class_name(dataset.classes, c.poison_class)} ({c.source})"
            for c in report.pair_choices
        )
    else:
        pair_text = ", ".join(
            f"{_class_name(dataset.classes, t)} -> {_class_name(dataset.classes, p)}"
            for t, p in config.get("pairs") or []
        )
    lines = [
        f"- dataset: {dataset.name} ({len(dataset.classes)} classes; re-training "
        f"{dataset.retrain_images} images, base pool {dataset.pool_images}, evaluation "
        f"{dataset.eval_images})",
        f"- pairs (target -> poison class): {pair_text or '?'}; "
        f"{config.get('targets_per_pair', '?')} targets per pair, "
        f"{len(report.instances)} instances, seed {report.seed}",
        f"- attack: {config.get('iterations', '?')} iterations, l-inf budget delta {delta_text}",
        "- poisons per instance: "
        + (", ".join(f"{n.upper()} {r.poisons_per_instance}" for n, r in report.attacks.items())),
        f"- re-training ({report.head_init} head): {config.get('retrain_epochs', '?')} epochs, "
        f"lr {config.get('retrain_lr', '?')} (x{config.get('retrain_gamma', '?')} after epochs "
        f"{list(config.get('retrain_milestones') or [])}), batch size "
        f"{config.get('retrain_batch_size', '?')}",
    ]
    if report.pre_acc is not None:
        lines.append(
            f"- Pre. Acc (clean test accuracy, {report.pre_acc_source or '?'}): "
            f"{percent(report.pre_acc, 2)}"
        )
    if report.screen is None:
        lines.append("- Eq. 4 feature screen: not run")
    return lines


def _class_name(classes: list[str], index: Any) -> str:
    if isinstance(index, int) and 0 <= index < len(classes):
        return f"{index} ({classes[index]})"
    return str(index)
