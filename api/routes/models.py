"""/v1/models: upload extractors, list them, download weights, read model cards."""

from __future__ import annotations

import uuid
from pathlib import PurePosixPath
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from api.deps import CeleryDep, CurrentTenant, SessionDep, SettingsDep, StoreDep
from api.errors import problem_responses
from api.schemas import MAX_OFFSET, JobPublic, ModelPublic, ModelsPage
from api.services import badges as badge_service
from api.services import jobs as job_service
from api.services import models as model_service
from api.services.jobs import SortOrder
from api.uploads import receive_upload
from catalog import ARCHS
from common.models import Job

router = APIRouter(prefix="/v1/models", tags=["models"])

UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "input_shape"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "model.safetensors, a torch.save state dict "
                            "(converted by a worker), a torch.export.save program (.pt2, "
                            "any architecture, checked by a worker and kept as uploaded), or "
                            "an ONNX graph (.onnx, where the deployment enables ONNX: "
                            "converted and re-exported as a .pt2 by a worker; 415 elsewhere)",
                        },
                        "arch": {
                            "type": "string",
                            "enum": list(ARCHS.names()),
                            "description": "required for safetensors and torch.save state dicts",
                        },
                        "input_shape": {"type": "string", "example": "3,32,32"},
                        "name": {"type": "string"},
                        "classes": {
                            "type": "string",
                            "example": '["airplane", "automobile"]',
                            "description": "JSON list of class names",
                        },
                        "mean": {"type": "string", "example": "0.49,0.48,0.45"},
                        "std": {"type": "string", "example": "0.25,0.24,0.26"},
                        "output": {
                            "type": "string",
                            "enum": ["logits", "features"],
                            "description": "what a .pt2 program or an .onnx graph (where "
                            "the deployment enables ONNX) outputs: features, the default (no "
                            "head: audits re-train one), or logits (its final linear layer is "
                            "the head)",
                        },
                    },
                }
            }
        },
    }
}


def location(url: str) -> dict[str, dict[str, Any]]:
    return {"Location": {"description": url, "schema": {"type": "string"}}}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelPublic,
    openapi_extra=UPLOAD_FORM,
    operation_id="uploadModel",
    summary="Upload an extractor",
    responses={
        201: {
            "description": "A safetensors file, checked: the model",
            "headers": location("the model's URL"),
        },
        202: {
            "model": JobPublic,
            "description": "A torch.save state dict, a torch.export program or an ONNX graph: "
            "the import job that converts or checks it (its result_model_id names the model "
            "once it succeeds)",
            "headers": location("the import job's URL"),
        },
        **problem_responses(413, 415, 422),
    },
)
async def upload_model(
    request: Request,
    response: Response,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    celery: CeleryDep,
    tenant: CurrentTenant,
) -> ModelPublic | JSONResponse:
    """Upload an extractor (streamed, size-limited).

    A safetensors file is checked without torch and answers 201 with the model. A
    ``torch.save`` state dict answers 202 with an import job: a worker reads it with
    ``torch.load(weights_only=True)`` and stores it as safetensors; the job's
    ``result_model_id`` is the model once it succeeds. A ``torch.export`` program (``.pt2``)
    answers 202 too: a worker checks it (nothing unpickled, an operator allowlist) and keeps it.
    An ONNX graph (``.onnx``) answers 202 where the deployment enables ONNX
    (``BULWARK_ONNX_ENABLED``): a worker converts it, re-exports it with ``torch.export`` and
    checks it as a ``.pt2``; elsewhere it answers 415.
    """
    upload = await receive_upload(
        request,
        file_field="file",
        staging=store.staging_file(),
        max_bytes=settings.max_upload_bytes,
    )
    registered = await run_in_threadpool(
        lambda: model_service.register_upload(
            session=session,
            store=store,
            celery=celery,
            settings=settings,
            tenant=tenant,
            upload=upload,
        )
    )
    if isinstance(registered, Job):  # a torch file: a worker converts it (202 with the job)
        return JSONResponse(
            status_code=status.HTTP_202_ACCEPTED,
            content=job_service.job_public(registered).model_dump(mode="json"),
            headers={"Location": f"/v1/jobs/{registered.id}"},
        )
    response.headers["Location"] = f"/v1/models/{registered.id}"
    return model_service.model_public(registered)


@router.get("", operation_id="listModels", summary="List models")
def list_models(
    session: SessionDep,
    tenant: CurrentTenant,
    sha256: Annotated[
        str | None,
        Query(
            pattern="^[0-9a-fA-F]{64}$",
            description="only models whose file has this sha256 (hex)",
        ),
    ] = None,
    name: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            pattern=r"^[^\x00-\x1f\x7f]+$",
            description="only models of this name",
        ),
    ] = None,
    order: Annotated[
        SortOrder, Query(description="by creation time: desc (newest first, the default) or asc")
    ] = "desc",
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> ModelsPage:
    models, total = model_service.list_models(
        session=session,
        tenant=tenant,
        sha256=sha256,
        name=name,
        order=order,
        limit=limit,
        offset=offset,
    )
    return ModelsPage(
        items=[model_service.model_public(m) for m in models],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{model_id}", operation_id="getModel", summary="Read a model")
def get_model(model_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> ModelPublic:
    return model_service.model_public(
        model_service.get_model(session=session, tenant=tenant, model_id=model_id)
    )


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteModel",
    summary="Delete a model",
    responses=problem_responses(409),
)
def delete_model(
    model_id: uuid.UUID, session: SessionDep, store: StoreDep, tenant: CurrentTenant
) -> Response:
    """Remove the model's files and keep its row as a tombstone: reads answer 404, a repeated
    DELETE is 204 too. Refused (409) while a queued or running job reads it (``job_ids``
    lists them). Finished jobs and their reports keep naming its id."""
    model_service.delete_model(session=session, store=store, tenant=tenant, model_id=model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{model_id}/weights",
    response_class=StreamingResponse,
    operation_id="getModelWeights",
    summary="Download a model's weights",
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "headers": {
                "X-Content-SHA256": {
                    "description": "sha256 of the file, hex",
                    "schema": {"type": "string"},
                },
                "Content-Length": {"description": "bytes", "schema": {"type": "integer"}},
            },
        }
    },
)
def download_weights(
    model_id: uuid.UUID, session: SessionDep, store: StoreDep, tenant: CurrentTenant
) -> StreamingResponse:
    """The model's safetensors file (or ``.pt2`` program), streamed from the artifact store;
    its sha256 is in the ``X-Content-SHA256`` header."""
    model = model_service.get_model(session=session, tenant=tenant, model_id=model_id)
    chunks, size = model_service.weights_stream(store=store, model=model)
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": attachment(
                f"{model.name}{PurePosixPath(model.weights_key).suffix}".replace("/", "_")
            ),
            "X-Content-SHA256": model.sha256,
        },
    )


def attachment(filename: str) -> str:
    """A Content-Disposition header naming ``filename`` (RFC 6266, as Starlette writes it)."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


class MarkdownResponse(PlainTextResponse):
    """Markdown text; Starlette adds ``charset=utf-8`` to ``text/*`` media types."""

    media_type = "text/markdown"


@router.get(
    "/{model_id}/card",
    response_class=MarkdownResponse,
    operation_id="getModelCard",
    summary="A model's Hugging Face model card (markdown)",
    responses={
        200: {
            "description": "A Hugging Face model card: YAML front matter and markdown",
            "content": {"text/markdown": {"schema": {"type": "string"}}},
        }
    },
)
def model_card(model_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> MarkdownResponse:
    """A Hugging Face model card: YAML front matter (license, tags, datasets and a
    ``model-index`` entry per audit) and a markdown body with provenance, the training recipe
    and every audit's protocol, ASR table and verdict."""
    model = model_service.get_model(session=session, tenant=tenant, model_id=model_id)
    return MarkdownResponse(model_service.model_card(session=session, model=model))


@router.get(
    "/{model_id}/badge.svg",
    response_class=Response,
    operation_id="getModelBadge",
    summary="A model's verdict badge (SVG)",
    responses={200: {"content": {"image/svg+xml": {"schema": {"type": "string"}}}}},
)
def verdict_badge(model_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> Response:
    """A shields-style badge of the verdict of the model's newest audit that has one:
    "bulwark | pass" (green), "fail" (red), "inconclusive" (amber), or "not audited" (grey).
    ``Cache-Control: no-cache``: a new audit changes it."""
    svg = badge_service.model_badge(session=session, tenant=tenant, model_id=model_id)
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-cache"})
