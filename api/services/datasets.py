"""Tenant datasets: registering uploads, listing, reading and deleting them.

The API checks an upload's container only, from its directory: an npz's member names and
declared sizes, an archive's paths, links, member count, declared size and compression ratio
(``core.archives``, torch-free), without inflating a member or loading numpy. A ``dataset``
job reads the files on a worker (``worker/datasets.py``).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.errors import BrokerUnavailableError, ConflictError, InvalidFieldError, NotFoundError
from api.ratelimit import check_stored_bytes
from api.schemas import DatasetPublic
from api.services import jobs as job_service
from api.services.jobs import SortOrder
from api.uploads import ReceivedUpload
from catalog import DATASET_FORMATS, infer_format
from catalog.requests import name_problem
from common.artifacts import ArtifactStore, dataset_data_key, dataset_upload_key
from common.models import DatasetStatus, Job, JobStatus, Tenant, TenantDataset, utcnow
from common.settings import Settings
from common.specs import DatasetImportSpec
from core.archives import ArchiveError, ArchiveLimits, ArchiveListing, inspect_archive

MAX_NAME_LENGTH = 200
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def dataset_public(dataset: TenantDataset) -> DatasetPublic:
    return DatasetPublic.model_validate(dataset)


def register_upload(
    *,
    session: Session,
    store: ArtifactStore,
    celery: Celery,
    settings: Settings,
    tenant: Tenant,
    upload: ReceivedUpload,
) -> TenantDataset:
    """Check the upload's container and form, store it, write the dataset (pending) and its
    job in one commit, then queue the job. A rejected upload leaves no file and no row."""
    staged = upload.staged
    try:
        if staged is None or upload.size == 0:
            raise InvalidFieldError.at(("body", "file"), "a non-empty dataset file is required")
        check_stored_bytes(session, settings, tenant, upload.size)  # 413 past the quota
        fmt = _format_field(upload)
        name = (upload.fields.get("name") or "").strip()
        if name and (problem := name_problem(name)) is not None:
            raise InvalidFieldError.at(("body", "name"), problem)
        name = name or (upload.filename or "dataset")[:MAX_NAME_LENGTH]
        check_container(staged, fmt)
        dataset = TenantDataset(
            id=uuid.uuid4(),
            tenant_id=tenant.id,
            name=name,
            format=fmt,
            status=DatasetStatus.PENDING,
            sha256=upload.sha256,
            size_bytes=upload.size,
            job_id=uuid.uuid4(),
        )
        spec = DatasetImportSpec(
            dataset_id=dataset.id,
            upload_key=dataset_upload_key(dataset.id),
            format=fmt,
            filename=upload.filename,
            sha256=upload.sha256,
        )
        store.publish(spec.upload_key, staged)
        try:
            job_service.submit_dataset(
                session=session,
                celery=celery,
                settings=settings,
                tenant=tenant,
                dataset=dataset,
                spec=spec,
            )
        except BrokerUnavailableError as error:  # the rows were committed; the job failed
            store.delete(spec.upload_key)
            dataset.status = DatasetStatus.FAILED
            dataset.error = error.message
            session.commit()
            raise
        except BaseException:
            store.delete(spec.upload_key)
            raise
        session.refresh(dataset)
        return dataset
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)


def _format_field(upload: ReceivedUpload) -> str:
    """The form's ``format``, else the one the file name means; a 422 on ``format`` if none."""
    given = (upload.fields.get("format") or "").strip()
    if given:
        if given not in DATASET_FORMATS:
            raise InvalidFieldError.at(("body", "format"), DATASET_FORMATS.unknown_message(given))
        return given
    inferred = infer_format(upload.filename)
    if inferred is None:
        raise InvalidFieldError.at(
            ("body", "format"),
            f"the file name {upload.filename!r} does not say which format it is; give format "
            f"({', '.join(DATASET_FORMATS)})",
        )
    return inferred


def check_container(path: Path, fmt: str) -> ArchiveListing:
    """The container of an upload in format ``fmt``, checked from its directory alone.

    Every archive rule of ``core.archives`` (paths, links, member count, declared size,
    compression ratio); a format with fixed members (npz) must hold exactly those, as files
    of a zip. A 422 on ``file`` names the problem.
    """
    try:
        listing = inspect_archive(path, ArchiveLimits())
    except ArchiveError as error:
        raise InvalidFieldError.at(("body", "file"), f"{fmt}: {error}") from None
    spec = DATASET_FORMATS.get(fmt)
    if spec.members is not None:
        problems = []
        if listing.kind != "zip":
            problems.append(f"an {fmt} is a zip archive, this file is a {listing.kind}")
        allowed = set(spec.members) | set(spec.optional_members)
        names = [m.name + ("/" if m.is_dir else "") for m in listing.members]
        unexpected = [n for n in names if n not in allowed]
        missing = [n for n in spec.members if n not in names]
        if unexpected:
            problems.append(f"unexpected members {unexpected}")
        if missing:
            problems.append(f"missing members {missing}")
        if problems:
            optional = " (and optionally " + ", ".join(spec.optional_members) + ")"
            raise InvalidFieldError.at(
                ("body", "file"),
                f"{fmt}: {'; '.join(problems)}; it must hold {', '.join(spec.members)}"
                f"{optional if spec.optional_members else ''}",
            )
    return listing


def get_dataset(*, session: Session, tenant: Tenant, dataset_id: uuid.UUID) -> TenantDataset:
    """The tenant's dataset; a deleted one, another tenant's or a missing one is a 404."""
    dataset = session.get(TenantDataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant.id or dataset.deleted_at is not None:
        raise NotFoundError(f"no dataset {dataset_id}")
    return dataset


def list_datasets(
    *, session: Session, tenant: Tenant, limit: int, offset: int, order: SortOrder = "desc"
) -> tuple[list[TenantDataset], int]:
    """The tenant's datasets, newest first (``order="asc"``: oldest first)."""
    query = select(TenantDataset).where(
        TenantDataset.tenant_id == tenant.id, TenantDataset.deleted_at.is_(None)
    )
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    created = TenantDataset.created_at.asc() if order == "asc" else TenantDataset.created_at.desc()
    datasets = session.scalars(
        query.order_by(created, TenantDataset.id).limit(limit).offset(offset)
    ).all()
    return list(datasets), total


def jobs_reading(session: Session, dataset: TenantDataset) -> list[Job]:
    """The queued or running jobs (audits, pre-trainings) that read ``dataset``."""
    return list(
        session.scalars(
            select(Job).where(
                Job.tenant_id == dataset.tenant_id,
                Job.status.in_(ACTIVE),
                Job.kind != "dataset",
                Job.spec["dataset_id"].as_string() == str(dataset.id),
            )
        ).all()
    )


def delete_dataset(
    *, session: Session, store: ArtifactStore, tenant: Tenant, dataset_id: uuid.UUID
) -> None:
    """Remove the dataset's files and tombstone its row; deleting it again changes nothing.

    Refused (409) while a job that reads it is queued or running. A dataset still being
    read has its dataset job cancelled: a queued one at once, a running one at its next
    step (its worker then deletes what it wrote).
    """
    dataset = session.get(TenantDataset, dataset_id, with_for_update=True)
    if dataset is None or dataset.tenant_id != tenant.id:
        raise NotFoundError(f"no dataset {dataset_id}")
    if dataset.deleted_at is not None:
        return
    readers = jobs_reading(session, dataset)
    if readers:
        session.rollback()
        raise ConflictError(
            f"dataset {dataset.id} is read by {len(readers)} queued or running job(s); cancel "
            "them or wait until they finish",
            job_ids=[str(job.id) for job in readers],
        )
    if dataset.status == DatasetStatus.PENDING and dataset.job_id is not None:
        # The job reading it ends at once if queued, at its next step if running.
        job_service.request_cancel(
            session, dataset.job_id, message="cancelled: its dataset was deleted"
        )
    dataset.deleted_at = utcnow()
    session.commit()
    for key in (dataset_data_key(dataset.id), dataset_upload_key(dataset.id)):
        store.delete(key)
