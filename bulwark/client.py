"""A typed Python client of a remote Bulwark service (``/v1``), torch-free.

It imports httpx, pydantic, tqdm and the torch-free request models of ``catalog``, nothing of
the core, torch or the API, so a hub's CI can ``pip install`` Bulwark and use it anywhere::

    from bulwark.client import BulwarkClient

    with BulwarkClient("https://bulwark.example.com", api_key) as bulwark:
        model = bulwark.upload_model("extractor.pt2", input_shape="3,32,32", output="features")
        data = bulwark.upload_dataset("hub.npz", name="hub")
        job = bulwark.submit_audit({"model_id": model["id"], "dataset_id": data["id"]})
        job = bulwark.wait(job.id)  # a tqdm bar; raises nothing when the job fails
        verdict = bulwark.report(job.id)["body"]["verdict"]["outcome"]
        card = bulwark.card(model["id"])

Requests that the server refuses raise a :class:`BulwarkError` built from its RFC 9457 problem
details (``application/problem+json``), or from FastAPI's older ``{"detail": ...}`` body: a
subclass per status a caller acts on (:class:`NotFound`, :class:`InvalidRequest` with every
invalid field in ``errors``, ...). 503, 429 and connection failures are retried with backoff
(honouring ``Retry-After``); job submissions carry an ``Idempotency-Key`` (one per logical
submit, the same on its retries), so a retried submit never makes a second job.
"""

# The exceptions are named for the answer (NotFound, Conflict), as HTTP clients name them.
# ruff: noqa: N818

from __future__ import annotations

import email.utils
import hashlib
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict

from catalog.policy import Policy
from catalog.requests import AuditJobCreate, PretrainJobCreate

__all__ = [
    "BulwarkClient",
    "BulwarkError",
    "ChecksumMismatch",
    "Conflict",
    "ConnectionFailed",
    "InvalidRequest",
    "Job",
    "JobFailed",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
]

# Job statuses after which nothing changes any more (common.models.JobStatus).
FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# Dataset statuses after which its dataset job has decided.
DATASET_DECIDED = frozenset({"ready", "failed"})
RETRIED_STATUSES = frozenset({429, 503})
# The longest Retry-After honoured: a server asking for more is waited on this long and asked
# again (the retry count still bounds the whole request).
MAX_RETRY_AFTER_SECONDS = 60.0
CHUNK_BYTES = 1 << 20


def client_version() -> str:
    try:
        return version("bulwark")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


# ---------------------------------------------------------------------------------- errors


class BulwarkError(Exception):
    """An answer the server refused with, as RFC 9457 problem details.

    ``status`` is the HTTP status (None for a request that never got an answer), ``title`` the
    problem's summary, ``detail`` its explanation, ``errors`` every invalid field
    (``{"loc": [...], "msg": ..., "type": ...}``), ``type`` the problem type URI
    (``about:blank`` when the server names none), ``instance`` the request it concerns and
    ``extensions`` any other members of the problem.
    """

    def __init__(
        self,
        status: int | None,
        title: str,
        detail: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        type: str = "about:blank",  # RFC 9457's member name
        *,
        instance: str | None = None,
        extensions: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = list(errors or [])
        self.type = type
        self.instance = instance
        self.extensions = dict(extensions or {})
        self.headers = dict(headers or {})
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """One line: the status, the title and the detail (or the fields' errors)."""
        head = f"{self.status} {self.title}" if self.status is not None else self.title
        if self.detail:
            return f"{head}: {self.detail}"
        if self.errors:
            return f"{head}: " + "; ".join(
                f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in self.errors
            )
        return head

    def problem(self) -> dict[str, Any]:
        """The problem details as a JSON object (what ``--json`` prints)."""
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.instance is not None:
            body["instance"] = self.instance
        if self.errors:
            body["errors"] = self.errors
        return {**self.extensions, **body}


class Unauthorized(BulwarkError):
    """401: no API key, or one the server does not know."""


class NotFound(BulwarkError):
    """404: no such resource (or another tenant's: both answer alike)."""


class Conflict(BulwarkError):
    """409: e.g. an Idempotency-Key reused for another request, or a resource in use."""


class PayloadTooLarge(BulwarkError):
    """413: an upload over the deployment's size limit."""


class InvalidRequest(BulwarkError):
    """422: ``errors`` lists every invalid field with its location."""


class RateLimited(BulwarkError):
    """429, after the client's retries."""


class Unavailable(BulwarkError):
    """503 (the job queue or a dependency is down), after the client's retries."""


class ConnectionFailed(BulwarkError):
    """The server could not be reached (or stopped answering), after the client's retries."""


class ChecksumMismatch(BulwarkError):
    """A download whose sha256 is not the one the API reports (the file is not kept)."""


class JobFailed(BulwarkError):
    """A job (an import, a dataset read) the call waited on failed or was cancelled."""

    def __init__(self, job: Job) -> None:
        self.job = job
        super().__init__(
            None,
            f"job {job.id} {job.status}",
            job.error or job.message or None,
            extensions={"job": job.model_dump(mode="json")},
        )


class WaitTimeout(BulwarkError, TimeoutError):
    """``wait`` gave up before the job finished (the job itself goes on)."""


ERRORS_BY_STATUS: dict[int, type[BulwarkError]] = {
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
    503: Unavailable,
}


def _field_errors(items: Any) -> list[dict[str, Any]]:
    """``[{"loc", "msg", "type"}]`` from a problem's ``errors`` or FastAPI's list ``detail``."""
    errors = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping):
            continue
        loc = item.get("loc", [])
        errors.append(
            {
                "loc": list(loc) if isinstance(loc, list | tuple) else [loc],
                "msg": str(item.get("msg", "")),
                "type": str(item.get("type", "value_error")),
            }
        )
    return errors


def error_from_response(response: httpx.Response) -> BulwarkError:
    """The exception of an error answer: RFC 9457 problem details, FastAPI's ``{"detail":
    ...}`` (a string, or a list of field errors), or any other body (its text as the detail)."""
    status = response.status_code
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = f"HTTP {status}"
    try:
        body = response.json()
    except ValueError:
        body = None
    detail: str | None
    errors: list[dict[str, Any]] = []
    extensions: dict[str, Any] = {}
    problem_type, instance = "about:blank", None
    if isinstance(body, dict) and ("title" in body or "type" in body or "errors" in body):
        title = str(body.get("title") or title)
        raw_detail = body.get("detail")
        detail = raw_detail if isinstance(raw_detail, str) or raw_detail is None else None
        errors = _field_errors(body.get("errors")) or _field_errors(raw_detail)
        problem_type = str(body.get("type") or "about:blank")
        instance = body.get("instance")
        reserved = {"type", "title", "status", "detail", "instance", "errors"}
        extensions = {k: v for k, v in body.items() if k not in reserved}
    elif isinstance(body, dict) and "detail" in body:
        raw_detail = body["detail"]
        if isinstance(raw_detail, list):
            errors, detail = _field_errors(raw_detail), None
        else:
            detail = str(raw_detail)
        extensions = {k: v for k, v in body.items() if k != "detail"}
    else:
        detail = response.text.strip()[:500] or None
    kind = ERRORS_BY_STATUS.get(status, BulwarkError)
    return kind(
        status,
        title,
        detail,
        errors,
        problem_type,
        instance=instance,
        extensions=extensions,
        headers=dict(response.headers),
    )


# ------------------------------------------------------------------------------------ jobs


class Job(BaseModel):
    """A job as ``GET /v1/jobs/{id}`` answers it; fields this client does not name are kept
    (``model_dump`` returns them too)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    kind: str
    status: str
    phase: str = ""
    progress: float = 0.0
    message: str = ""
    eta_seconds: float | None = None
    error: str | None = None
    model_id: str | None = None
    result_model_id: str | None = None
    report_url: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


RequestModel = TypeVar("RequestModel", PretrainJobCreate, AuditJobCreate)


def _request_body(spec: BaseModel | Mapping[str, Any], model: type[RequestModel]) -> dict[str, Any]:
    """The JSON body of a job request, validated here first (a ``pydantic.ValidationError``
    names every invalid field before anything is sent). Only the fields the caller set are
    sent, so the server's defaults apply to the rest."""
    checked = model.model_validate(spec.model_dump() if isinstance(spec, BaseModel) else spec)
    return checked.model_dump(mode="json", exclude_unset=True)


# ---------------------------------------------------------------------------------- client


class BulwarkClient:
    """A client of one Bulwark deployment, authenticated with one tenant's API key.

    ``timeout`` is per HTTP request (seconds); ``retries`` how many times a request that met
    503, 429 or a connection failure is tried again, waiting ``Retry-After`` when the server
    sends one, else an exponential backoff from ``backoff`` seconds (with jitter, at most
    ``max_backoff``). ``transport`` replaces httpx's (tests, proxies).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        headers = {
            "User-Agent": f"bulwark-client/{client_version()}",
            "Accept": "application/json, application/problem+json",
        }
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )
        self.sleep: Callable[[float], None] = time.sleep  # replaced in tests

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> BulwarkClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the one request path

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds before try ``attempt + 1``: the server's Retry-After, else backoff."""
        if response is not None:
            after = retry_after_seconds(response.headers.get("Retry-After"))
            if after is not None:
                return min(after, MAX_RETRY_AFTER_SECONDS)
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        return delay * (0.5 + random.random() / 2)  # jitter: clients retrying together spread

    def _send(
        self,
        method: str,
        path: str,
        *,
        expect: tuple[int, ...] = (200,),
        retry_sent: bool = True,
        stream: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send with retries; the answer if its status is in ``expect``, else the error.

        ``retry_sent``: whether a request that may have reached the server (a read timeout,
        a dropped connection) may be sent again; False for POSTs that are not idempotent.
        Callables among ``kwargs`` values are called per try (a file re-opened each time).
        A 304 is always returned (the caller sent If-None-Match).
        """
        last_error: httpx.TransportError | None = None
        for attempt in range(self.retries + 1):
            arguments = {k: v() if callable(v) else v for k, v in kwargs.items()}
            try:
                request = self.http.build_request(method, path, **arguments)
                response = self.http.send(request, stream=stream)
            except httpx.TransportError as error:
                last_error = error
                # A refused connection never reached the server: always safe to resend.
                if attempt == self.retries or not (
                    retry_sent or isinstance(error, httpx.ConnectError)
                ):
                    break
                self.sleep(self._delay(attempt, None))
                continue
            finally:
                _close_files(arguments.get("files"))
            if response.status_code in expect or response.status_code == 304:
                return response
            if response.status_code in RETRIED_STATUSES and attempt < self.retries:
                response.close()
                self.sleep(self._delay(attempt, response))
                continue
            if stream:
                response.read()
            raise error_from_response(response)
        raise ConnectionFailed(
            None,
            "connection failed",
            f"{method} {self.url}{path}: {last_error or 'no answer'} "
            f"(tried {self.retries + 1} times)",
        )

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    # -------------------------------------------------------------------------------- jobs

    def submit_pretrain(
        self,
        spec: PretrainJobCreate | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
    ) -> Job:
        """``POST /v1/jobs/pretrain``: the queued job. ``spec`` is validated here first."""
        return self._submit("pretrain", _request_body(spec, PretrainJobCreate), idempotency_key)

    def submit_audit(
        self,
        spec: AuditJobCreate | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
    ) -> Job:
        """``POST /v1/jobs/audit``: the queued job. ``spec`` is validated here first."""
        return self._submit("audit", _request_body(spec, AuditJobCreate), idempotency_key)

    def _submit(self, kind: str, body: dict[str, Any], idempotency_key: str | None) -> Job:
        # One key per logical submit, the same on every retry: the server answers a repeat
        # with the job the first try made.
        key = idempotency_key or str(uuid.uuid4())
        response = self._send(
            "POST",
            f"/v1/jobs/{kind}",
            expect=(200, 201, 202),
            json=body,
            headers={"Idempotency-Key": key},
        )
        return Job.model_validate(response.json())

    def job(self, job_id: str | uuid.UUID) -> Job:
        return Job.model_validate(self._json("GET", f"/v1/jobs/{job_id}"))

    def jobs(self, **filters: Any) -> dict[str, Any]:
        """A page of the tenant's jobs (``kind``, ``status``, ``limit``, ``offset``)."""
        params = {k: v for k, v in filters.items() if v is not None}
        return dict(self._json("GET", "/v1/jobs", params=params))

    def cancel(self, job_id: str | uuid.UUID) -> Job:
        return Job.model_validate(self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait(
        self,
        job_id: str | uuid.UUID,
        *,
        progress: bool = True,
        timeout: float = 24 * 3600.0,
        poll: float = 0.5,
        max_poll: float = 10.0,
        bar_file: IO[str] | None = None,
    ) -> Job:
        """Poll the job until it finishes; the finished job (whatever its status).

        Polls every ``poll`` seconds while the job changes, backing off (x1.5, at most
        ``max_poll``) while it does not. With an ``ETag`` from the server each poll sends
        ``If-None-Match`` and a 304 means unchanged. ``progress`` shows a tqdm bar of the
        job's progress, described by its phase. Raises :class:`WaitTimeout` after
        ``timeout`` seconds (the job goes on).
        """
        from tqdm import tqdm

        deadline = time.monotonic() + timeout
        bar = (
            tqdm(total=100, unit="%", desc="queued", file=bar_file, dynamic_ncols=True)
            if progress
            else None
        )
        etag: str | None = None
        job: Job | None = None
        interval = poll
        try:
            while True:
                headers = {"If-None-Match": etag} if etag else {}
                response = self._send("GET", f"/v1/jobs/{job_id}", headers=headers)
                if response.status_code == 304 and job is not None:
                    interval = min(max_poll, interval * 1.5)
                else:
                    changed = job is None or response.json() != job.model_dump(mode="json")
                    job = Job.model_validate(response.json())
                    etag = response.headers.get("ETag", etag)
                    interval = poll if changed else min(max_poll, interval * 1.5)
                    if bar is not None:
                        bar.n = round(100 * max(0.0, min(1.0, job.progress)), 1)
                        bar.set_description(job.phase or job.status, refresh=False)
                        if job.message:
                            bar.set_postfix_str(job.message[:60], refresh=False)
                        bar.refresh()
                if job.finished:
                    return job
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(
                        None,
                        "wait timed out",
                        f"job {job_id} still {job.status} after {timeout:g} s",
                    )
                self.sleep(min(interval, remaining))
        finally:
            if bar is not None:
                bar.close()

    def report(self, job_id: str | uuid.UUID) -> dict[str, Any]:
        """``GET /v1/jobs/{id}/report``: the signed report (``body``: the audit report,
        with its ``verdict``; ``signature``: the deployment's Ed25519 signature over it,
        checked by ``bulwark verify``)."""
        return dict(self._json("GET", f"/v1/jobs/{job_id}/report"))

    # ------------------------------------------------------------------------------ models

    def models(self, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """A page of the tenant's models: ``items``, ``total``, ``limit``, ``offset``."""
        return dict(self._json("GET", "/v1/models", params={"limit": limit, "offset": offset}))

    def model(self, model_id: str | uuid.UUID) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/models/{model_id}"))

    def card(self, model_id: str | uuid.UUID) -> str:
        """The model's Hugging Face model card (YAML front matter and markdown)."""
        return self._send(
            "GET", f"/v1/models/{model_id}/card", headers={"Accept": "text/markdown"}
        ).text

    def download_weights(self, model_id: str | uuid.UUID, path: str | Path) -> Path:
        """Stream the model's weights to ``path`` (a file, or an existing folder: the file
        is named as the server names it) and check their sha256 against the API's; the path
        written. A mismatch raises :class:`ChecksumMismatch` and keeps nothing."""
        expected = str(self.model(model_id)["sha256"])
        target = Path(path)
        response = self._send(
            "GET",
            f"/v1/models/{model_id}/weights",
            stream=True,
            headers={"Accept": "application/octet-stream"},
        )
        try:
            if target.is_dir():
                target = target / _attachment_name(response, f"{model_id}.safetensors")
            header = response.headers.get("X-Content-SHA256")
            partial = target.with_name(target.name + ".part")
            digest = hashlib.sha256()
            with partial.open("wb") as out:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
        finally:
            response.close()
        actual = digest.hexdigest()
        for source, claimed in (("the model", expected), ("X-Content-SHA256", header)):
            if claimed is not None and claimed != actual:
                partial.unlink(missing_ok=True)
                raise ChecksumMismatch(
                    None,
                    "checksum mismatch",
                    f"model {model_id}: downloaded sha256 {actual}, {source} says {claimed}",
                )
        partial.replace(target)
        return target

    def upload_model(
        self,
        path: str | Path,
        *,
        wait: bool = True,
        progress: bool = False,
        timeout: float = 3600.0,
        **form: str | None,
    ) -> dict[str, Any]:
        """``POST /v1/models`` with the file and its form fields (``input_shape``, ``arch``,
        ``name``, ``classes``, ``mean``, ``std``, ``output``: see the API's upload form).

        A safetensors file answers with the model. A torch, ``.pt2`` or ONNX file answers
        with an import job: with ``wait`` (the default) this waits for it and returns the
        model it made (raising :class:`JobFailed` if it failed); without, the job's JSON.
        """
        answer = self._upload("/v1/models", Path(path), form)
        if answer.status_code != 202:
            return dict(answer.json())
        job = Job.model_validate(answer.json())
        if not wait:
            return job.model_dump(mode="json")
        job = self.wait(job.id, progress=progress, timeout=timeout)
        if not job.succeeded or job.result_model_id is None:
            raise JobFailed(job)
        return self.model(job.result_model_id)

    def upload_dataset(
        self,
        path: str | Path,
        *,
        wait: bool = True,
        progress: bool = False,
        timeout: float = 3600.0,
        **form: str | None,
    ) -> dict[str, Any]:
        """``POST /v1/datasets`` (``name``, ``format``): the dataset. A worker reads it;
        with ``wait`` (the default) this waits until it is ``ready`` (raising
        :class:`JobFailed` if the worker refused it), without, it returns it ``pending``."""
        dataset = dict(self._upload("/v1/datasets", Path(path), form).json())
        if not wait or dataset.get("job_id") is None:
            return dataset
        job = self.wait(dataset["job_id"], progress=progress, timeout=timeout)
        dataset = self.dataset(dataset["id"])
        if dataset["status"] != "ready":
            raise JobFailed(job.model_copy(update={"error": dataset.get("error") or job.error}))
        return dataset

    def _upload(self, route: str, path: Path, form: Mapping[str, str | None]) -> httpx.Response:
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}")
        data = {k: str(v) for k, v in form.items() if v is not None}
        # Uploads carry no Idempotency-Key (the API takes none there): resent only when the
        # server answered 503/429 or the connection was refused, never after a dropped one.
        return self._send(
            "POST",
            route,
            expect=(200, 201, 202),
            retry_sent=False,
            data=data,
            files=lambda: {"file": (path.name, path.open("rb"), "application/octet-stream")},
        )

    # ---------------------------------------------------------------------------- datasets

    def datasets(self, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """A page of the tenant's datasets: ``items``, ``total``, ``limit``, ``offset``."""
        return dict(self._json("GET", "/v1/datasets", params={"limit": limit, "offset": offset}))

    def dataset(self, dataset_id: str | uuid.UUID) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/datasets/{dataset_id}"))

    # ------------------------------------------------------------------------------ policy

    def policy(self) -> dict[str, Any]:
        """The policy in force (``version`` null and ``default`` true while none is stored)."""
        return dict(self._json("GET", "/v1/policy"))

    def put_policy(self, policy: Policy | Mapping[str, Any]) -> dict[str, Any]:
        """Store a new version of the tenant's policy (validated here first); the version."""
        checked = Policy.model_validate(
            policy.model_dump(mode="json") if isinstance(policy, Policy) else policy
        )
        return dict(
            self._json("PUT", "/v1/policy", expect=(200, 201), json=checked.model_dump(mode="json"))
        )


# --------------------------------------------------------------------------------- helpers


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delay-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _attachment_name(response: httpx.Response, fallback: str) -> str:
    """The file name of a ``Content-Disposition`` (``filename*`` or ``filename``), made safe."""
    from urllib.parse import unquote

    header = response.headers.get("Content-Disposition", "")
    name = None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == "filename*" and "''" in value:
            name = unquote(value.split("''", 1)[1])
            break
        if key == "filename":
            name = value.strip('"')
    name = Path(name).name if name else ""
    return name if name not in ("", ".", "..") else fallback


def _close_files(value: Any) -> None:
    """Close the files a per-try ``files=`` argument opened."""
    if isinstance(value, Mapping):
        for item in value.values():
            handle = item[1] if isinstance(item, tuple) and len(item) > 1 else item
            if hasattr(handle, "close") and hasattr(handle, "read"):
                handle.close()


def iter_pages(
    fetch: Callable[..., dict[str, Any]], *, page_size: int = 200, max_items: int = 100_000
) -> Iterator[dict[str, Any]]:
    """Every item of a paged listing (``client.models``, ``client.datasets``), page by page;
    at most ``max_items``."""
    offset = 0
    while offset < max_items:
        page = fetch(limit=page_size, offset=offset)
        yield from page["items"]
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return
