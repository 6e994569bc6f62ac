"""Stream a multipart upload straight into the artifact store's staging area.

Starlette's own form parser spools whole files to a temporary directory before the route
runs; here the body is parsed as it arrives, the file part goes to a staging file while its
size and sha256 are counted, and the upload stops as soon as it passes the size limit. The
caller owns the staging file (publish it or delete it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import InvalidFieldError, ServiceError, UploadTooLargeError
from catalog.requests import CONTROL_CHARACTERS, NAME_MAX

MAX_FIELD_BYTES = 64 * 1024
MAX_FILENAME_LENGTH = NAME_MAX
MAX_FIELDS = 32
FORM_OVERHEAD_BYTES = MAX_FIELDS * MAX_FIELD_BYTES  # what a body may hold besides the file


class MalformedBodyError(ServiceError):
    """A multipart body that does not parse, or ends before its closing boundary (400)."""

    status_code = 400
    slug = "malformed-body"
    title = "Malformed request body"


@dataclass
class ReceivedUpload:
    fields: dict[str, str] = field(default_factory=dict)
    staged: Path | None = None  # the file part, if any
    filename: str | None = None
    size: int = 0
    sha256: str = ""


class _Receiver:
    def __init__(self, *, file_field: str, staging: Path, max_bytes: int) -> None:
        self.file_field, self.staging, self.max_bytes = file_field, staging, max_bytes
        self.result = ReceivedUpload()
        self._headers: dict[bytes, bytes] = {}
        self._header_field = self._header_value = b""
        self._name = ""
        self._value = bytearray()
        self._sink: BinaryIO | None = None
        self._digest = hashlib.sha256()
        self.parts_open = 0  # parts begun and not yet ended
        self.complete = False  # the closing boundary was read

    def on_part_begin(self) -> None:
        self.parts_open += 1
        self._headers, self._value = {}, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            if self._name != self.file_field or self._sink is not None:
                raise InvalidFieldError.at(
                    ("body", self._name), f"only one file is accepted, as field {self.file_field!r}"
                )
            filename = options[b"filename"].decode("utf-8", "replace")
            # The name is stored (job specs, manifests, default model names): keep it storable.
            if len(filename) > MAX_FILENAME_LENGTH or CONTROL_CHARACTERS.search(filename):
                raise InvalidFieldError.at(
                    ("body", self._name),
                    f"the file name must be at most {MAX_FILENAME_LENGTH} characters, without "
                    "control characters",
                )
            self.result.filename = filename
            self.result.staged = self.staging
            self._sink = self.staging.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._sink is not None and self._name == self.file_field and self.result.staged:
            self.result.size += len(chunk)
            if self.result.size > self.max_bytes:
                raise UploadTooLargeError(
                    f"the file exceeds the upload limit of {self.max_bytes} bytes",
                    limit_bytes=self.max_bytes,
                )
            self._digest.update(chunk)
            self._sink.write(chunk)
            return
        self._value += chunk
        if len(self._value) > MAX_FIELD_BYTES:
            raise InvalidFieldError.at(("body", self._name), f"longer than {MAX_FIELD_BYTES} bytes")

    def on_end(self) -> None:
        self.complete = True

    def on_part_end(self) -> None:
        self.parts_open -= 1
        if self._sink is not None and self.result.staged is not None and not self.result.sha256:
            self._sink.close()
            self.result.sha256 = self._digest.hexdigest()
            return
        if len(self.result.fields) >= MAX_FIELDS:
            raise InvalidFieldError.at(("body",), f"more than {MAX_FIELDS} form fields")
        self.result.fields[self._name] = self._value.decode("utf-8", "replace")

    def close(self) -> None:
        if self._sink is not None and not self._sink.closed:
            self._sink.close()


async def receive_upload(
    request: Request, *, file_field: str, staging: Path, max_bytes: int
) -> ReceivedUpload:
    """Parse the multipart body of ``request``; the file goes to ``staging``.

    Raises :class:`UploadTooLargeError` (413) past ``max_bytes`` of file data, before reading
    the rest; on any error the staging file is removed.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidFieldError.at(("body",), "send multipart/form-data with a file field")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + FORM_OVERHEAD_BYTES:
        raise UploadTooLargeError(
            f"the request declares {declared} bytes; the upload limit is {max_bytes} bytes",
            limit_bytes=max_bytes,
        )
    receiver = _Receiver(file_field=file_field, staging=staging, max_bytes=max_bytes)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": receiver.on_part_begin,
            "on_part_data": receiver.on_part_data,
            "on_part_end": receiver.on_part_end,
            "on_header_field": receiver.on_header_field,
            "on_header_value": receiver.on_header_value,
            "on_header_end": receiver.on_header_end,
            "on_headers_finished": receiver.on_headers_finished,
            "on_end": receiver.on_end,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
        # A body cut short (no closing boundary) leaves its last part unfinished: its file
        # would be kept without a sha256. Only a body that ended properly counts.
        if not receiver.complete or receiver.parts_open:
            raise MalformedBodyError(
                "the multipart body ends before its closing boundary; send the whole form"
            )
    except MultipartParseError as error:
        receiver.close()
        staging.unlink(missing_ok=True)
        raise MalformedBodyError(f"the multipart body does not parse: {error}") from None
    except BaseException:
        receiver.close()
        staging.unlink(missing_ok=True)
        raise
    receiver.close()
    return receiver.result
