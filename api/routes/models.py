"""/v1/models: upload extractors, list them, download weights, read model cards."""

from __future__ import annotations

import uuid
from pathlib import PurePosixPath
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from api.deps import CeleryDep, CurrentTenant, SessionDep, SettingsDep, StoreDep
from api.schemas import ModelPublic, ModelsPage
from api.services import badges as badge_service
from api.services import jobs as job_service
from api.services import models as model_service
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


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=ModelPublic, openapi_extra=UPLOAD_FORM
)
async def upload_model(
    request: Request,
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
        )
    return model_service.model_public(registered)


@router.get("")
def list_models(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ModelsPage:
    models, total = model_service.list_models(
        session=session, tenant=tenant, limit=limit, offset=offset
    )
    return ModelsPage(
        items=[model_service.model_public(m) for m in models],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{model_id}")
def get_model(model_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> ModelPublic:
    return model_service.model_public(
        model_service.get_model(session=session, tenant=tenant, model_id=model_id)
    )


@router.get(
    "/{model_id}/weights",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
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
    responses={200: {"content": {"image/svg+xml": {}}}},
)
def verdict_badge(model_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> Response:
    """A shields-style badge of the verdict of the model's newest audit that has one:
    "bulwark | pass" (green), "fail" (red), "inconclusive" (amber), or "not audited" (grey).
    ``Cache-Control: no-cache``: a new audit changes it."""
    svg = badge_service.model_badge(session=session, tenant=tenant, model_id=model_id)
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-cache"})
