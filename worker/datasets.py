"""Tenant datasets on the worker: read an upload into the canonical npz, and fetch a ready
dataset for the job that audits or pre-trains on it.

The upload is untrusted. The API checked its container only; here the core reads it
(``core.datasets.tenant``: archives extracted within limits, npz arrays read with
``allow_pickle=False``), and the dataset's row gets the facts and the key of the canonical npz,
or the reason it was refused. Either way the upload is deleted, and a refused dataset keeps
no file.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import cast

from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from common.artifacts import dataset_data_key
from common.db import rows_matched
from common.models import DatasetStatus, TenantDataset
from common.specs import DatasetImportSpec
from core.archives import ArchiveLimits
from core.progress import Progress
from worker.jobs import (
    JobCancelledError,
    JobFailedError,
    ProgressWriter,
    Resources,
    failure_message,
)


def import_dataset(
    spec: DatasetImportSpec,
    *,
    tenant_id: uuid.UUID,
    resources: Resources,
    progress: ProgressWriter,
    work_dir: Path,
) -> str:
    """Read the upload of ``spec``, store its canonical npz, mark the dataset ready; the
    message for the job. On any failure the dataset is marked failed with the reason, and
    every file written for it (and the upload) is deleted before the error goes on."""
    store = resources.store
    with resources.session_factory() as session:
        dataset = session.get(TenantDataset, spec.dataset_id)
        if dataset is None or dataset.tenant_id != tenant_id:
            store.delete(spec.upload_key)
            raise JobFailedError(f"dataset {spec.dataset_id} does not exist")
        if dataset.status == DatasetStatus.READY:  # a redelivered job that had finished
            store.delete(spec.upload_key)
            return "dataset ready"
    try:
        message = _read_and_store(spec, resources=resources, progress=progress, work_dir=work_dir)
    except OperationalError:  # the database went away: the retry needs the upload
        raise
    except BaseException as error:
        store.delete(dataset_data_key(spec.dataset_id))
        store.delete(spec.upload_key)
        shutil.rmtree(work_dir, ignore_errors=True)
        _mark_failed(resources, spec.dataset_id, _reason(error))
        raise
    store.delete(spec.upload_key)
    shutil.rmtree(work_dir, ignore_errors=True)
    return message


def _read_and_store(
    spec: DatasetImportSpec, *, resources: Resources, progress: ProgressWriter, work_dir: Path
) -> str:
    from core.datasets.tenant import (
        TenantFormat,
        dataset_facts,
        read_tenant_dataset,
        write_canonical_npz,
    )

    store = resources.store
    work_dir.mkdir(parents=True, exist_ok=True)
    upload = work_dir / "upload" / _local_name(spec.filename)
    progress(Progress(phase="fetch", fraction=0.0, message="fetching the upload"))
    store.fetch(spec.upload_key, upload)
    progress(Progress(phase="read", fraction=0.1, message=f"reading the {spec.format} upload"))
    data = read_tenant_dataset(
        upload,
        cast("TenantFormat", spec.format),
        work_dir=work_dir / "files",
        limits=ArchiveLimits(),
    )
    upload.unlink(missing_ok=True)
    facts = dataset_facts(data)
    progress(Progress(phase="store", fraction=0.8, message="writing the canonical npz"))
    data_key = dataset_data_key(spec.dataset_id)
    staged = store.staging_file()
    try:
        write_canonical_npz(data, staged)
        store.publish(data_key, staged)
    finally:
        staged.unlink(missing_ok=True)
    with resources.session_factory() as session:
        marked = rows_matched(
            session.execute(
                update(TenantDataset)
                .where(TenantDataset.id == spec.dataset_id, TenantDataset.deleted_at.is_(None))
                .values(
                    status=DatasetStatus.READY,
                    error=None,
                    data_key=data_key,
                    classes=list(facts["classes"]),
                    image_shape={
                        "channels": facts["channels"],
                        "height": facts["height"],
                        "width": facts["width"],
                    },
                    train_counts=list(facts["train_per_class"]),
                    test_counts=list(facts["test_per_class"]),
                )
            )
        )
        session.commit()
    if not marked:
        raise JobFailedError("the dataset was deleted while it was being read")
    return (
        f"dataset ready: {len(facts['classes'])} classes, {facts['train_images']} training and "
        f"{facts['test_images']} test images of {facts['channels']}x{facts['height']}x"
        f"{facts['width']}"
    )


def _reason(error: BaseException) -> str:
    """The dataset's error: the job's, in words a user can act on."""
    if isinstance(error, JobCancelledError):
        return "cancelled before the upload was read"
    if isinstance(error, Exception):
        return failure_message(error)[0]
    return f"the dataset job was stopped ({type(error).__name__})"


def _local_name(filename: str | None) -> str:
    """The upload's local file name: the client's base name (the core's messages name the
    upload by it) reduced to safe characters, one path component."""
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-100:].lstrip(".")
    return safe or "upload"


def _mark_failed(resources: Resources, dataset_id: uuid.UUID, reason: str) -> None:
    with resources.session_factory() as session:
        session.execute(
            update(TenantDataset)
            .where(TenantDataset.id == dataset_id)
            .values(status=DatasetStatus.FAILED, error=reason, data_key=None)
        )
        session.commit()


def fetch_dataset(
    resources: Resources, *, dataset_id: uuid.UUID, tenant_id: uuid.UUID, work_dir: Path
) -> str:
    """The local path of the tenant's ready dataset, fetched into ``work_dir``: what the
    job's config reads as ``data_dir`` (the catalog's tenant-dataset entry)."""
    with resources.session_factory() as session:
        dataset = session.get(TenantDataset, dataset_id)
        if (
            dataset is None
            or dataset.tenant_id != tenant_id
            or dataset.deleted_at is not None
            or dataset.status != DatasetStatus.READY
            or dataset.data_key is None
        ):
            raise JobFailedError(f"dataset {dataset_id} was deleted or is not ready")
        data_key = dataset.data_key
    path = work_dir / "dataset" / "data.npz"
    resources.store.fetch(data_key, path)
    return str(path)
