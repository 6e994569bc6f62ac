"""The Celery tasks: thin wrappers that re-read the job, call the core, persist the result.

One task per job kind of ``catalog.JOB_KINDS``, registered under the kind's task name; each
kind's work is one executor function in :data:`EXECUTORS`. Tasks take only the job id (the
message is JSON); everything else is read from the database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ValidationError
from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from catalog import JOB_KINDS, JobKindSpec
from common.artifacts import model_manifest_key, model_program_key, model_weights_key
from common.models import (
    Job,
    JobStatus,
    ModelSource,
    Report,
    StoredModel,
    TenantDataset,
    utcnow,
)
from common.policies import current_policy
from common.settings import Settings
from common.specs import (
    AuditJobCreate,
    DatasetImportSpec,
    ImportJobSpec,
    PretrainJobCreate,
    SpecError,
    resolve_audit,
    resolve_pretrain,
)
from core.config import AuditConfig, PretrainConfig
from core.progress import Progress
from worker.celery_app import app
from worker.datasets import fetch_dataset, import_dataset
from worker.jobs import (
    Heartbeat,
    JobCancelledError,
    JobFailedError,
    JobLostError,
    ProgressWriter,
    Resources,
    WorkerStoppingError,
    claim_job,
    failure_message,
    finish_job,
    give_back_job,
    release_lease,
    send_job,
    stop_on_sigterm,
    stop_requested,
    worker_name,
    worker_resources,
)

logger = logging.getLogger(__name__)
Execute = Callable[[Job, Resources, ProgressWriter], None]
ConfigT = TypeVar("ConfigT", bound=BaseModel)


def run_job(task: Task, job_id: str, *, execute: Execute) -> None:
    """Claim the job, run ``execute`` under a lease heartbeat, record how it ended.

    A SIGTERM while it runs (the worker is stopping) gives the job back to the queue at the
    next progress step, to resume from its checkpoint on another worker (``give_back_job``);
    a cancel requested meanwhile wins."""
    resources = worker_resources()
    settings = resources.settings
    job_uuid = uuid.UUID(job_id)
    worker = worker_name()
    with stop_on_sigterm():
        if stop_requested.is_set():  # stopping before the claim: leave the job for the next
            send_job(task.app, settings=settings, job_id=job_uuid, kind=_kind_of(task))
            return
        job = claim_job(resources=resources, job_id=job_uuid, worker=worker)
        if job is None:
            return
        logger.info("job %s (%s) attempt %d on %s", job.id, job.kind, job.attempts, worker)
        try:
            with Heartbeat(resources=resources, job_id=job.id, worker=worker) as heartbeat:
                progress = ProgressWriter(resources=resources, job_id=job.id, heartbeat=heartbeat)
                execute(job, resources, progress)
        except WorkerStoppingError:
            given = give_back_job(
                resources=resources, job_id=job.id, worker=worker, celery=task.app
            )
            logger.info("job %s: worker stopping; job given back (%s)", job.id, given)
        except JobLostError:
            logger.warning("job %s was taken over by another worker; this run stops", job.id)
        except JobCancelledError:
            finish_job(
                resources=resources,
                job_id=job.id,
                status=JobStatus.CANCELLED,
                phase="cancelled",
                message="cancelled while running",
            )
        except SoftTimeLimitExceeded:
            finish_job(
                resources=resources,
                job_id=job.id,
                status=JobStatus.FAILED,
                phase="time limit",
                error=f"the job ran past the worker's time limit of "
                f"{settings.task_soft_time_limit_seconds} s; ask for fewer epochs or iterations",
            )
        except OperationalError as error:  # the database went away: transient, retry later
            logger.warning("job %s: database error, retrying: %s", job.id, error)
            with contextlib.suppress(OperationalError):
                release_lease(resources=resources, job_id=job.id)
            raise task.retry(
                exc=error, countdown=settings.lease_seconds + 5, max_retries=5
            ) from error
        except Exception as error:
            message, internal = failure_message(error)
            finish_job(
                resources=resources,
                job_id=job.id,
                status=JobStatus.FAILED,
                phase="failed",
                error=message,
            )
            if internal:
                logger.exception("job %s failed", job.id)


def _kind_of(task: Task) -> str:
    """The job kind whose task ``task`` is (``catalog.JOB_KINDS`` names each kind's task)."""
    return next(kind.name for kind in JOB_KINDS.entries() if kind.task == task.name)


def dataset_dir(settings: Settings, name: str) -> str | None:
    if settings.datasets_dir is not None and (settings.datasets_dir / name).is_dir():
        return str(settings.datasets_dir / name)
    return None


def job_work_dir(settings: Settings, job_id: uuid.UUID) -> Path:
    """Local scratch of one job: the resumable training state survives a worker crash here."""
    return settings.resolved_work_dir / str(job_id)


def job_data_dir(
    resources: Resources,
    job: Job,
    dataset: str | None,
    dataset_id: uuid.UUID | None,
    work_dir: Path,
) -> str | None:
    """Where the job's data is: a built-in dataset's folder, or the tenant dataset's canonical
    npz fetched into the work dir (the config reads it as the tenant-dataset entry)."""
    if dataset_id is not None:
        return fetch_dataset(
            resources, dataset_id=dataset_id, tenant_id=job.tenant_id, work_dir=work_dir
        )
    return dataset_dir(resources.settings, dataset) if dataset is not None else None


def job_config(
    job: Job, config_type: type[ConfigT], resolve: Callable[[], ConfigT], **service: Any
) -> ConfigT:
    """The core config the job was submitted with (its row's ``config``), with the fields the
    service fills in (paths, device) added; a row written before configs were stored is
    resolved from its spec now."""
    try:
        if job.config is None:
            return resolve()
        return config_type.model_validate({**job.config, **service})
    except (SpecError, ValidationError) as error:
        raise JobFailedError(f"invalid config: {error}") from None


def execute_pretrain(job: Job, resources: Resources, progress: ProgressWriter) -> None:
    """Pre-train a hardened extractor; a redelivery resumes from the last finished epoch."""
    from core.train import pretrain

    settings = resources.settings
    spec = PretrainJobCreate.model_validate(job.spec)
    work_dir = job_work_dir(settings, job.id)
    data_dir = job_data_dir(resources, job, spec.dataset, spec.dataset_id, work_dir)
    config = job_config(
        job, PretrainConfig, lambda: resolve_pretrain(spec, data_dir=data_dir), data_dir=data_dir
    )
    out_dir = work_dir / "checkpoint"
    result = pretrain(config, out_dir=out_dir, work_dir=work_dir, progress=progress)

    model_id = _store_model(
        resources,
        job,
        out_dir,
        result.manifest,
        source=ModelSource.PRETRAIN,
        name=spec.name
        or f"{spec.arch}-{spec.defense}-{spec.dataset or 'dataset'}-{job.id.hex[:8]}",
    )
    with resources.session_factory() as session:
        _mark_succeeded(
            session, job.id, result_model_id=model_id, message=f"Pre. Acc {result.pre_acc:.4f}"
        )
    shutil.rmtree(work_dir, ignore_errors=True)


def _store_model(
    resources: Resources,
    job: Job,
    out_dir: Path,
    manifest: dict[str, Any],
    *,
    name: str,
    source: ModelSource,
    program: bool = False,
) -> uuid.UUID:
    """Publish ``out_dir``'s checkpoint and write its model row; the id follows from the job
    id, so a redelivered job never makes a second model. ``program``: the checkpoint is a
    ``torch.export`` program (``model.pt2``) rather than ``model.safetensors``."""
    from core.checkpoint import EXPORTED_NAME, MANIFEST_NAME, WEIGHTS_NAME

    model_id = uuid.uuid5(job.id, "model")
    weights = out_dir / (EXPORTED_NAME if program else WEIGHTS_NAME)
    weights_key = model_program_key(model_id) if program else model_weights_key(model_id)
    resources.store.put_file(weights_key, weights)
    resources.store.put_file(model_manifest_key(model_id), out_dir / MANIFEST_NAME)
    with resources.session_factory() as session:
        if session.get(StoredModel, model_id) is None:
            session.add(
                StoredModel(
                    id=model_id,
                    tenant_id=job.tenant_id,
                    name=name,
                    source=source,
                    arch=manifest["arch"],
                    num_classes=manifest["num_classes"],
                    in_channels=manifest["in_channels"],
                    feature_dim=manifest["feature_dim"],
                    manifest=manifest,
                    sha256=manifest["weights_sha256"],
                    size_bytes=weights.stat().st_size,
                    weights_key=weights_key,
                )
            )
            session.commit()
    return model_id


def execute_import(job: Job, resources: Resources, progress: ProgressWriter) -> None:
    """Read an uploaded torch state dict (weights only) and store it as a safetensors model;
    a ``torch.export`` program is checked and stored as it was uploaded; an ONNX graph is
    converted into one first."""
    spec = ImportJobSpec.model_validate(job.spec)
    try:
        if spec.format in ("export", "onnx"):
            _import_exported(job, spec, resources, progress)
        else:
            _convert_upload(job, spec, resources, progress)
    except OperationalError:  # transient: the retry needs the upload
        raise
    except BaseException:  # the job ends here: the untrusted file is not kept
        resources.store.delete(spec.upload_key)
        shutil.rmtree(job_work_dir(resources.settings, job.id), ignore_errors=True)
        raise
    resources.store.delete(spec.upload_key)


def _convert_upload(
    job: Job, spec: ImportJobSpec, resources: Resources, progress: ProgressWriter
) -> None:
    from core.checkpoint import MANIFEST_NAME, load_extractor, save_extractor
    from core.progress import Progress

    work_dir = job_work_dir(resources.settings, job.id)
    work_dir.mkdir(parents=True, exist_ok=True)
    upload = work_dir / "upload.pt"
    progress(
        Progress(
            phase="import", fraction=0.0, message="reading the torch file with weights_only=True"
        )
    )
    resources.store.fetch(spec.upload_key, upload)
    described: dict[str, Any] = {"arch": spec.arch, "in_channels": spec.input_shape[0]}
    if spec.mean is not None and spec.std is not None:
        described["normalization"] = {"mean": spec.mean, "std": spec.std}
    try:
        # The restricted unpickler of weights_only refuses anything but tensors and containers.
        loaded = load_extractor(upload, manifest=described)
    finally:
        upload.unlink(missing_ok=True)
    model = loaded.model
    problems = []
    if spec.classes is not None and len(spec.classes) != model.num_classes:
        problems.append(f"classes: {len(spec.classes)} names for a head of {model.num_classes}")
    if spec.mean is None and "normalization" not in loaded.manifest:
        problems.append("mean/std: the weights hold no normalize.mean/std; give mean and std")
    if problems:
        raise JobFailedError("the upload does not match its form: " + "; ".join(problems))
    manifest = {
        "kind": "uploaded-extractor",
        "input_shape": spec.input_shape,
        "source_file": spec.filename,
        "source_sha256": spec.sha256,
        **({"classes": spec.classes} if spec.classes else {}),
    }
    out_dir = work_dir / "checkpoint"
    save_extractor(out_dir, model, manifest)
    full_manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    model_id = _store_model(
        resources,
        job,
        out_dir,
        full_manifest,
        source=ModelSource.UPLOAD,
        name=spec.name or spec.filename or "uploaded model",
    )
    with resources.session_factory() as session:
        _mark_succeeded(
            session, job.id, result_model_id=model_id, message="converted to safetensors"
        )
    shutil.rmtree(work_dir, ignore_errors=True)


def _import_exported(
    job: Job, spec: ImportJobSpec, resources: Resources, progress: ProgressWriter
) -> None:
    """Check an uploaded ``torch.export`` program (``core.exported``: nothing unpickled, an
    operator allowlist, a run on the declared input shape) and store it untouched, with its
    manifest, as an ``exported`` model.

    An ONNX graph (``format="onnx"``) is first converted (``core.onnx_import``: standard
    operators only, onnx2torch) and re-exported with ``torch.export`` on the declared input
    shape into a ``.pt2``, which then takes exactly the path of an uploaded one: the stored
    model is that program, audited as any exported model."""
    from core.exported import save_exported
    from core.progress import Progress

    work_dir = job_work_dir(resources.settings, job.id)
    work_dir.mkdir(parents=True, exist_ok=True)
    upload = work_dir / "upload.pt2"
    provenance: dict[str, Any] = {"source_file": spec.filename, "source_sha256": spec.sha256}
    if spec.format == "onnx":
        from core.onnx_import import export_onnx

        progress(Progress(phase="convert", fraction=0.0, message="converting the ONNX graph"))
        graph = work_dir / "upload.onnx"
        resources.store.fetch(spec.upload_key, graph)
        try:
            # Messages name the file as the user sent it, not this scratch copy.
            sent = PurePosixPath((spec.filename or "").replace("\\", "/")).name or graph.name
            export_onnx(graph, upload, input_shape=spec.input_shape, name=sent)
        finally:
            graph.unlink(missing_ok=True)
        provenance["source_format"] = "onnx"
    else:
        resources.store.fetch(spec.upload_key, upload)
    progress(Progress(phase="import", fraction=0.5, message="checking the torch.export program"))
    out_dir = work_dir / "checkpoint"
    try:
        loaded = save_exported(
            upload,
            out_dir,
            input_shape=spec.input_shape,
            output=spec.output,
            mean=spec.mean,
            std=spec.std,
            classes=spec.classes,
            manifest=provenance,
        )
    finally:
        upload.unlink(missing_ok=True)
    model_id = _store_model(
        resources,
        job,
        out_dir,
        loaded.manifest,
        source=ModelSource.UPLOAD,
        name=spec.name or spec.filename or "exported model",
        program=True,
    )
    checked = f"torch.export program checked: {loaded.model.feature_dim}-d features"
    if spec.format == "onnx":
        checked = f"ONNX graph converted; {checked}"
    with resources.session_factory() as session:
        _mark_succeeded(session, job.id, result_model_id=model_id, message=checked)
    shutil.rmtree(work_dir, ignore_errors=True)


def execute_audit(job: Job, resources: Resources, progress: ProgressWriter) -> None:
    """Attack a stored extractor (and its undefended reference) with the chosen attacks,
    decide the verdict under the tenant's policy and store the report."""
    from core.audit import run_audit
    from core.verdict import decide

    settings, store = resources.settings, resources.store
    spec = AuditJobCreate.model_validate(job.spec)
    work_dir = job_work_dir(settings, job.id)
    with resources.session_factory() as session:
        model = session.get(StoredModel, job.model_id) if job.model_id else None
        if model is None:
            raise JobFailedError("the model to audit was deleted before the audit ran")
        model_dir = _fetch_model(resources, model, work_dir / "model")
        model_id, model_arch, model_manifest = model.id, model.arch, dict(model.manifest)
    data_dir = job_data_dir(resources, job, spec.dataset, spec.dataset_id, work_dir)
    config = job_config(
        job,
        AuditConfig,
        lambda: resolve_audit(spec, model=str(model_dir), data_dir=data_dir),
        model=str(model_dir),
        data_dir=data_dir,
    )
    reference = audit_reference(
        resources,
        job,
        spec,
        config,
        {**model_manifest, "arch": model_arch},
        work_dir / "reference",
        progress,
    )
    # The tenant's policy in force now decides the verdict (and, for a sequential audit,
    # when to stop crafting); its version is recorded with the verdict.
    with resources.session_factory() as session:
        version, policy = current_policy(session, job.tenant_id)
    poisons_dir = work_dir / "poisons"
    report = run_audit(
        config.model_copy(update={"reference": reference.path}),
        progress=progress,
        poisons_dir=poisons_dir,
        reference_source=reference.source,
        policy=policy,
        # A redelivered audit (its worker died) resumes after its last finished attack.
        state_dir=work_dir / "audit-state",
    )
    # The poisons (exact .npz and a .png strip per attack) go to the store beside the report.
    stored = []
    for path in sorted(poisons_dir.glob("*")) if poisons_dir.is_dir() else []:
        key = f"reports/{job.id}/poisons/{path.name}"
        store.put_file(key, path)
        stored.append(key)
    # What the tenant reads names the models by their API paths, never by this worker's
    # scratch paths (the folders and the dataset file are gone once the job ends anyway).
    public_model = f"/v1/models/{model_id}"
    updates: dict[str, Any] = {
        "stored_artifacts": stored,
        "model": report.model.model_copy(update={"path": public_model}),
        "config": {**report.config, "model": public_model, "data_dir": None, "reference": None},
        "reference_note": reference.note if report.reference is None else None,
    }
    if report.reference is not None:
        updates["reference"] = report.reference.model_copy(
            update={"model": report.reference.model.model_copy(update={"path": reference.public})}
        )
    report = report.model_copy(update=updates)
    report = report.model_copy(update={"verdict": decide(report, policy, version=version)})
    body = report.model_dump(mode="json")
    report_id = uuid.uuid5(job.id, "report")
    with resources.session_factory() as session:
        if session.get(Report, report_id) is None:
            session.add(
                Report(
                    id=report_id,
                    tenant_id=job.tenant_id,
                    job_id=job.id,
                    model_id=model_id,
                    body=body,
                )
            )
        _mark_succeeded(
            session,
            job.id,
            result_model_id=None,
            message=f"verdict {report.verdict.outcome}"
            if report.verdict is not None
            else "report ready",
        )
    shutil.rmtree(work_dir, ignore_errors=True)


def _fetch_model(resources: Resources, model: StoredModel, folder: Path) -> Path:
    """A stored model's checkpoint folder on this worker: ``model.safetensors`` (or
    ``model.pt2`` for a torch.export program, ``core.exported``) and its manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    resources.store.fetch(model.weights_key, folder / PurePosixPath(model.weights_key).name)
    (folder / "manifest.json").write_text(json.dumps(model.manifest))
    return folder


@dataclass(frozen=True)
class AuditReference:
    """The reference an audit runs against: its local folder (None: no reference), how it was
    chosen, the path a tenant reads for it, and why there is none where there is none."""

    path: str | None
    source: Literal["named", "auto"]
    public: str
    note: str | None


def audit_reference(
    resources: Resources,
    job: Job,
    spec: AuditJobCreate,
    config: AuditConfig,
    manifest: dict[str, Any],
    folder: Path,
    progress: ProgressWriter,
) -> AuditReference:
    """The audit's undefended reference (``AuditRequest.reference``).

    A model id: that model of the tenant. ``auto``: the model's undefended twin
    (``core.reference``), taken from the artifact store's cache or pre-trained here and put
    there for later audits; shared between tenants for a built-in dataset, the tenant's own
    for its dataset. A model with no automatic reference is audited without one, and the
    report says why.
    """
    from core.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
    from core.reference import (
        NoAutoReferenceError,
        auto_reference_config,
        ensure_reference,
        reference_key,
    )

    if spec.reference == "none":
        return AuditReference(None, "named", "", "no reference: the request asked for none")
    if isinstance(spec.reference, uuid.UUID):
        with resources.session_factory() as session:
            named = session.get(StoredModel, spec.reference)
            if named is None or named.tenant_id != job.tenant_id:
                raise JobFailedError(f"the reference model {spec.reference} no longer exists")
            path = _fetch_model(resources, named, folder)
        return AuditReference(str(path), "named", f"/v1/models/{spec.reference}", None)
    try:
        pretrain = auto_reference_config(manifest, config)
    except NoAutoReferenceError as error:
        return AuditReference(None, "auto", "", error.user_message)
    if spec.dataset_id is not None:
        with resources.session_factory() as session:
            dataset = session.get(TenantDataset, spec.dataset_id)
            identity = f"dataset:{spec.dataset_id}:{dataset.sha256 if dataset else ''}"
        owner = str(job.tenant_id)
    else:
        identity, owner = f"builtin:{spec.dataset}", "shared"
    prefix = f"references/{owner}/{reference_key(pretrain, identity)}"
    store = resources.store
    files = (WEIGHTS_NAME, MANIFEST_NAME)
    if all(store.exists(f"{prefix}/{name}") for name in files):
        folder.mkdir(parents=True, exist_ok=True)
        for name in files:
            store.fetch(f"{prefix}/{name}", folder / name)
    else:

        def report(update: Progress) -> None:
            # The reference's pre-training shows as its own phase; the audit's bar starts
            # after it.
            progress(
                replace(
                    update,
                    phase=f"reference pre-training: {update.phase}"[:64],
                    fraction=0.0,
                )
            )

        ensure_reference(
            pretrain.model_copy(update={"device": config.device}), folder, progress=report
        )
        for name in files:
            store.put_file(f"{prefix}/{name}", folder / name)
    # Not a route: an auto reference is no tenant model; its key names it in the report.
    return AuditReference(str(folder), "auto", f"auto-reference:{prefix.rsplit('/', 1)[1]}", None)


def execute_dataset(job: Job, resources: Resources, progress: ProgressWriter) -> None:
    """Read a tenant's dataset upload into its canonical npz and facts (the dataset's row)."""
    spec = DatasetImportSpec.model_validate(job.spec)
    message = import_dataset(
        spec,
        tenant_id=job.tenant_id,
        resources=resources,
        progress=progress,
        work_dir=job_work_dir(resources.settings, job.id),
    )
    with resources.session_factory() as session:
        _mark_succeeded(session, job.id, result_model_id=None, message=message)


def _mark_succeeded(
    session: Session, job_id: uuid.UUID, *, result_model_id: uuid.UUID | None, message: str
) -> None:
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            status=JobStatus.SUCCEEDED,
            phase="done",
            progress=1.0,
            message=message,
            eta_seconds=None,
            error=None,
            finished_at=now,
            updated_at=now,
            lease_expires_at=None,
            result_model_id=result_model_id,
        )
    )
    from common.webhooks import record_job_event  # local: the edit stays in this function

    record_job_event(session, job_id)  # job.succeeded, committed with the status
    session.commit()


# The work of each job kind; every kind of catalog.JOB_KINDS needs one.
EXECUTORS: dict[str, Execute] = {
    "pretrain": execute_pretrain,
    "audit": execute_audit,
    "import": execute_import,
    "dataset": execute_dataset,
}


def _register(kind: JobKindSpec) -> Task:
    """The Celery task of ``kind``, named as the catalog names it (the API sends that name)."""
    try:
        execute = EXECUTORS[kind.name]
    except KeyError:
        raise LookupError(
            f"job kind {kind.name!r} is in catalog.JOB_KINDS but has no executor in "
            "worker.tasks.EXECUTORS"
        ) from None

    def run(task: Task, job_id: str) -> None:
        run_job(task, job_id, execute=execute)

    run.__name__ = run.__qualname__ = f"run_{kind.name}"
    run.__doc__ = f"Run a job of kind {kind.name!r}: {kind.title}."
    return app.task(name=kind.task, bind=True)(run)


TASKS: dict[str, Task] = {kind.name: _register(kind) for kind in JOB_KINDS.entries()}
