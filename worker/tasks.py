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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ValidationError
from sqlalchemy import case, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from catalog import JOB_KINDS, JobKindSpec
from catalog.jobs import AuditPartSpec
from common.artifacts import model_manifest_key, model_program_key, model_weights_key
from common.audit_parts import WAITING_FOR_PARTS
from common.db import rows_matched
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
    """Pre-train a hardened extractor; a redelivery resumes from the last finished epoch.

    A config with ``devices`` N > 1 runs as N processes on this machine's GPUs 0..N-1 (on
    the CPU, N gloo processes; ``core.distributed``), started by ``pretrain`` itself: the
    worker must see N GPUs, else the job fails naming the count. The API admits N up to
    ``max_devices_per_job``.
    """
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
    published = (weights_key, model_manifest_key(model_id))
    try:
        resources.store.put_file(weights_key, weights)
        resources.store.put_file(model_manifest_key(model_id), out_dir / MANIFEST_NAME)
        _write_model_row(resources, job, model_id, manifest, name, source, weights, weights_key)
    except BaseException:
        # No row, no files: a job that fails here (a name the column refuses, the database
        # gone) leaves no weights nobody can reach; a retry publishes them again.
        if not _model_row_exists(resources, model_id):
            for key in published:
                with contextlib.suppress(Exception):
                    resources.store.delete(key)
        raise
    return model_id


def _model_row_exists(resources: Resources, model_id: uuid.UUID) -> bool:
    try:
        with resources.session_factory() as session:
            return session.get(StoredModel, model_id) is not None
    except Exception:  # the database is gone: keep the files for the retry
        return True


def _write_model_row(
    resources: Resources,
    job: Job,
    model_id: uuid.UUID,
    manifest: dict[str, Any],
    name: str,
    source: ModelSource,
    weights: Path,
    weights_key: str,
) -> None:
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


# A torch.save zip holds one record per tensor plus data.pkl and a few version files.
MAX_TORCH_ZIP_MEMBERS = 4096


def _check_torch_zip(upload: Path, settings: Settings) -> None:
    """Refuse, before ``torch.load`` inflates anything, a torch file that is not a readable
    zip, or whose members declare more than the upload limit once inflated, or inflate past
    ``ArchiveLimits.max_ratio`` (a zip bomb); torch allocates each record at its declared
    size, so the declared sizes bound the worker's memory."""
    import zipfile

    from core.archives import ArchiveError, ArchiveLimits, inspect_archive

    if not zipfile.is_zipfile(upload):
        raise JobFailedError("the torch file is not a readable zip (torch.save writes one)")
    limits = ArchiveLimits(
        max_members=MAX_TORCH_ZIP_MEMBERS, max_total_bytes=settings.max_upload_bytes
    )
    try:
        inspect_archive(upload, limits)
    except ArchiveError as error:
        raise JobFailedError(f"the torch file is refused before loading: {error}") from None


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
    _check_torch_zip(upload, resources.settings)
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
    from core.audit import audit_parts, run_audit
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
    audited = config.model_copy(update={"reference": reference.path})
    state_dir = work_dir / "audit-state"
    scoring: Callable[[Progress], None] = progress
    fanned = fans_out(settings, audited)
    if fanned:
        # The attacks run as audit-part jobs on any worker; this claim gives its slot back
        # until they are done, then scores what they crafted (progress 90% to 100%).
        if not _audit_parts_ready(job, resources, audited, state_dir, progress):
            return
        scoring = _scoring_progress(progress)
    report = run_audit(
        audited,
        progress=scoring,
        poisons_dir=poisons_dir,
        reference_source=reference.source,
        policy=policy,
        # A redelivered audit (its worker died) resumes after its last finished attack.
        state_dir=state_dir,
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
    if fanned:  # the parts' crafting is in the report now
        for part in audit_parts(audited):
            resources.store.delete(audit_part_key(job.id, part))


def fans_out(settings: Settings, config: AuditConfig) -> bool:
    """Whether the audit runs its attacks as ``audit-part`` jobs (``config.reference`` is
    resolved: it decides the reference's parts). A sequential audit decides between rounds,
    so it stays one task; so does an audit too small to pay for a process per part
    (``audit_fan_out_min_work``)."""
    from core.audit import audit_parts

    if not settings.audit_fan_out or config.sequential or len(audit_parts(config)) < 2:
        return False
    # The pair sets are resolved by the core: count what each may add, as the API's size
    # check does.
    adds = {"closest": config.closest_pairs, "random": config.random_pairs}
    pairs = len(config.pairs) + sum(adds.get(name, 1) for name in config.pair_sets or ())
    work = config.iterations * config.targets_per_pair * max(1, pairs) * config.max_poisons
    return work >= settings.audit_fan_out_min_work


def audit_part_key(audit_id: uuid.UUID, part: str) -> str:
    """Where an audit part's crafting (``core.audit.AuditState``'s ``<part>.pt``) is stored."""
    return f"audits/{audit_id}/parts/{part}.pt"


def audit_part_id(audit_id: uuid.UUID, part: str) -> uuid.UUID:
    """The id of an audit's part job: the same on every claim, so parts are made once."""
    return uuid.uuid5(audit_id, part)


def _audit_parts_ready(
    job: Job,
    resources: Resources,
    config: AuditConfig,
    state_dir: Path,
    progress: ProgressWriter,
) -> bool:
    """Make the audit's part jobs (once) and send the unfinished ones; if all succeeded, put
    their files in ``state_dir`` for the scoring run and return True. Otherwise remove the
    job's work dir (``state_dir``'s parent) and give this
    worker's slot back (the audit waits, running but held by no worker, until its last part
    re-sends it: ``resume_audit``) and return False. A part that failed fails the audit."""
    from core.audit import AuditState, audit_parts

    parts = audit_parts(config)
    ids = {part: audit_part_id(job.id, part) for part in parts}
    with resources.session_factory() as session:
        for part, part_id in ids.items():
            if session.get(Job, part_id) is None:
                session.add(
                    Job(
                        id=part_id,
                        tenant_id=job.tenant_id,
                        kind="audit-part",
                        spec={"part": part},
                        config=job.config,
                        model_id=job.model_id,
                        parent_id=job.id,
                    )
                )
        session.commit()
        rows = {row.id: row for row in session.scalars(select(Job).where(Job.id.in_(ids.values())))}
    for part, part_id in ids.items():
        row = rows[part_id]
        if row.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise JobFailedError(f"part {part}: {row.error or row.message or row.status.value}")
    waiting = [part for part, part_id in ids.items() if rows[part_id].status != JobStatus.SUCCEEDED]
    if waiting:
        # Costliest first (its attack's poisons; every part runs the same iterations): the
        # workers then finish at about the same time instead of one waiting on a last big part.
        waiting.sort(key=lambda part: -config.poisons(part.split("-")[1]))
        for part in waiting:
            if rows[ids[part]].status == JobStatus.QUEUED:
                send_job(app, settings=resources.settings, job_id=ids[part], kind="audit-part")
        progress(
            Progress(
                phase=WAITING_FOR_PARTS,
                fraction=0.0,
                message=f"{len(parts) - len(waiting)} of {len(parts)} parts done",
            )
        )
        # This worker's copies go before the slot does: the scoring claim may land here.
        shutil.rmtree(state_dir.parent, ignore_errors=True)
        _wait_for_parts(job, resources)
        resume_audit(resources, job.id)  # the last part may have finished meanwhile
        return False
    AuditState.open(state_dir, config)  # the scoring run keeps what is in it
    for part in parts:
        resources.store.fetch(audit_part_key(job.id, part), state_dir / f"{part}.pt")
    return True


def _wait_for_parts(job: Job, resources: Resources) -> None:
    """Give the audit's worker slot back while its parts run: running, held by no worker, the
    attempt not counted (the claim did not crash its worker), with a lease that only re-sends
    it should its last part's message be lost (``renew_waiting_audit``). A cancel requested
    meanwhile wins: the audit ends cancelled and stops its parts."""
    settings = resources.settings
    now = utcnow()
    with resources.session_factory() as session:
        ours = (Job.id == job.id) & (Job.worker == job.worker) & (Job.status == JobStatus.RUNNING)
        waiting = rows_matched(
            session.execute(
                update(Job)
                .where(ours, Job.cancel_requested.is_(False))
                .values(
                    worker=None,
                    phase=WAITING_FOR_PARTS,
                    lease_expires_at=now + timedelta(seconds=settings.requeue_queued_after_seconds),
                    attempts=case((Job.attempts > 0, Job.attempts - 1), else_=0),
                    eta_seconds=None,
                    updated_at=now,
                )
            )
        )
        session.commit()
        if waiting:
            return
        if session.scalar(select(Job.id).where(ours)) is not None:
            raise JobCancelledError  # run_job ends it cancelled; _finish stops the parts
    raise JobLostError  # a part failed it meanwhile, or another worker holds it


def resume_audit(resources: Resources, audit_id: uuid.UUID) -> None:
    """Once every part of the waiting audit ``audit_id`` succeeded, let it be claimed again
    (its lease ends now) and re-send it: it scores. Run by each part as it finishes and by
    the audit itself after it gave its slot back, so one of them sees the last part done;
    a duplicate message is harmless (the claim lets one delivery run the job)."""
    with resources.session_factory() as session:
        pending = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.parent_id == audit_id, Job.status != JobStatus.SUCCEEDED)
        )
        if pending:
            return
        released = rows_matched(
            session.execute(
                update(Job)
                .where(
                    Job.id == audit_id,
                    Job.status == JobStatus.RUNNING,
                    Job.worker.is_(None),
                    Job.phase == WAITING_FOR_PARTS,
                )
                .values(lease_expires_at=utcnow(), phase=PARTS_DONE, message="all parts done")
            )
        )
        session.commit()
    if released:
        send_job(app, settings=resources.settings, job_id=audit_id, kind="audit")


def _scoring_progress(progress: ProgressWriter) -> Callable[[Progress], None]:
    """The scoring run of a fanned-out audit fills the last tenth of its bar (its parts
    filled the rest)."""

    def report(update: Progress) -> None:
        progress(replace(update, fraction=PARTS_SHARE + (1 - PARTS_SHARE) * update.fraction))

    return report


PARTS_DONE = "parts done; scoring next"
PARTS_SHARE = 0.9  # of a fanned-out audit's progress bar: its parts; the rest is scoring


class _PartProgress:
    """A part's progress callback: its own row through ``progress``, and, at most once per
    progress interval, its waiting audit's row: the parts' progress weighted by each part's
    crafting work, over ``PARTS_SHARE`` of the bar."""

    def __init__(
        self, resources: Resources, audit_id: uuid.UUID, weight: Callable[[str], float]
    ) -> None:
        self.resources, self.audit_id, self.weight = resources, audit_id, weight
        self.interval = resources.settings.progress_interval_seconds
        self._last = -float("inf")

    def __call__(self, update: Progress) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.write()

    def write(self) -> None:
        with self.resources.session_factory() as session:
            rows = session.execute(
                select(Job.spec, Job.status, Job.progress).where(Job.parent_id == self.audit_id)
            ).all()
            done = sum(1 for row in rows if row.status == JobStatus.SUCCEEDED)
            weights = [self.weight(str(row.spec.get("part", "-x-"))) for row in rows]
            shares = [1.0 if row.status == JobStatus.SUCCEEDED else row.progress for row in rows]
            fraction = sum(w * f for w, f in zip(weights, shares, strict=True)) / (
                sum(weights) or 1.0
            )
            session.execute(
                update(Job)
                .where(
                    Job.id == self.audit_id,
                    Job.status == JobStatus.RUNNING,
                    Job.worker.is_(None),
                )
                .values(
                    progress=PARTS_SHARE * min(1.0, fraction),
                    message=f"{done} of {len(rows)} parts done",
                    updated_at=utcnow(),
                )
            )
            session.commit()


def execute_audit_part(job: Job, resources: Resources, progress: ProgressWriter) -> None:
    """Craft one part of an audit (``core.audit.craft_audit_parts``) and store its file for
    the audit's scoring run; the last part to finish re-sends the audit. A part redelivered
    after its file was stored (its worker died before it said so) crafts nothing."""
    from core.audit import craft_audit_parts

    settings, store = resources.settings, resources.store
    part = AuditPartSpec.model_validate(job.spec).part
    with resources.session_factory() as session:
        audit = session.get(Job, job.parent_id) if job.parent_id else None
        model = session.get(StoredModel, job.model_id) if job.model_id else None
        if audit is None or model is None:
            raise JobFailedError("the audit or its model was deleted before this part ran")
        spec = AuditJobCreate.model_validate(audit.spec)
        work_dir = job_work_dir(settings, job.id)
        model_dir = _fetch_model(resources, model, work_dir / "model")
        manifest = {**model.manifest, "arch": model.arch}
    key = audit_part_key(audit.id, part)
    if not store.exists(key):
        data_dir = job_data_dir(resources, job, spec.dataset, spec.dataset_id, work_dir)
        config = job_config(
            job,
            AuditConfig,
            lambda: resolve_audit(spec, model=str(model_dir), data_dir=data_dir),
            model=str(model_dir),
            data_dir=data_dir,
        )
        reference = None
        if part.startswith("reference-"):
            # The audit resolved (and for ``auto`` pre-trained and cached) it before it made
            # the parts: this fetches it.
            reference = audit_reference(
                resources, job, spec, config, manifest, work_dir / "reference", progress
            ).path
        config = config.model_copy(update={"reference": reference})
        audit_progress = _PartProgress(
            resources,
            audit.id,
            lambda name: float(config.poisons(name.split("-")[1]) * config.iterations),
        )

        def report(update: Progress) -> None:
            progress(update)
            audit_progress(update)

        state_dir = work_dir / "audit-state"
        craft_audit_parts(config, [part], state_dir=state_dir, progress=report)
        store.put_file(key, state_dir / f"{part}.pt")
    with resources.session_factory() as session:
        _mark_succeeded(session, job.id, result_model_id=None, message=f"part {part} crafted")
    shutil.rmtree(work_dir, ignore_errors=True)
    _PartProgress(resources, audit.id, lambda _name: 1.0).write()
    resume_audit(resources, audit.id)


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
    "audit-part": execute_audit_part,
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

    # An identifier: Celery compiles a signature check under this name (audit-part).
    run.__name__ = run.__qualname__ = f"run_{kind.name.replace('-', '_')}"
    run.__doc__ = f"Run a job of kind {kind.name!r}: {kind.title}."
    return app.task(name=kind.task, bind=True)(run)


TASKS: dict[str, Task] = {kind.name: _register(kind) for kind in JOB_KINDS.entries()}
