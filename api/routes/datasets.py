"""/v1/datasets: upload a tenant's own image set, list, read and delete it."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from api.deps import CeleryDep, CurrentTenant, SessionDep, SettingsDep, StoreDep
from api.errors import problem_responses
from api.schemas import MAX_OFFSET, DatasetPublic, DatasetsPage
from api.services import datasets as dataset_service
from api.services.jobs import SortOrder
from api.uploads import receive_upload
from catalog import DATASET_FORMATS

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "an .npz of x_train, y_train, x_test, y_test "
                            "(optional classes); a .zip or .tar(.gz) image folder; or "
                            "cifar-10-python.tar.gz",
                        },
                        "format": {
                            "type": "string",
                            "enum": list(DATASET_FORMATS.names()),
                            "description": "default: inferred from the file name",
                        },
                        "name": {"type": "string", "maxLength": 200},
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DatasetPublic,
    openapi_extra=UPLOAD_FORM,
    operation_id="uploadDataset",
    summary="Upload a dataset",
    responses={
        202: {
            "description": "The dataset, pending until its dataset job has read it",
            "headers": {
                "Location": {"description": "the dataset's URL", "schema": {"type": "string"}}
            },
        },
        **problem_responses(413, 422),
    },
)
async def upload_dataset(
    request: Request,
    response: Response,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    celery: CeleryDep,
    tenant: CurrentTenant,
) -> DatasetPublic:
    """Upload a dataset (streamed, size-limited): 202 with the dataset, ``pending``.

    The API checks the container only (member names, links, paths, declared sizes), without
    inflating anything; a ``dataset`` job (``job_id``) reads the files on a worker, and the
    dataset becomes ``ready`` with its facts, or ``failed`` with the reason.
    """
    upload = await receive_upload(
        request,
        file_field="file",
        staging=store.staging_file(),
        max_bytes=settings.max_upload_bytes,
    )
    dataset = await run_in_threadpool(
        lambda: dataset_service.register_upload(
            session=session,
            store=store,
            celery=celery,
            settings=settings,
            tenant=tenant,
            upload=upload,
        )
    )
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return dataset_service.dataset_public(dataset)


@router.get("", operation_id="listDatasets", summary="List datasets")
def list_datasets(
    session: SessionDep,
    tenant: CurrentTenant,
    order: Annotated[
        SortOrder, Query(description="by creation time: desc (newest first, the default) or asc")
    ] = "desc",
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> DatasetsPage:
    datasets, total = dataset_service.list_datasets(
        session=session, tenant=tenant, limit=limit, offset=offset, order=order
    )
    return DatasetsPage(
        items=[dataset_service.dataset_public(d) for d in datasets],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{dataset_id}", operation_id="getDataset", summary="Read a dataset")
def get_dataset(dataset_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> DatasetPublic:
    return dataset_service.dataset_public(
        dataset_service.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    )


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteDataset",
    summary="Delete a dataset",
    responses=problem_responses(409),
)
def delete_dataset(
    dataset_id: uuid.UUID, session: SessionDep, store: StoreDep, tenant: CurrentTenant
) -> Response:
    """Remove the dataset's files and keep its row as a tombstone; a repeated DELETE is 204
    too. Refused (409) while a job that reads it is queued or running."""
    dataset_service.delete_dataset(
        session=session, store=store, tenant=tenant, dataset_id=dataset_id
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
