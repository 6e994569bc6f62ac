"""``bulwark verify``: check the deployment's signature on a report from the API.

REPORT.json is what ``GET /v1/jobs/{id}/report`` answered (its ``body`` and ``signature``). The
public key comes from ``--public-key FILE`` (a PEM, or the JSON that
``GET /.well-known/bulwark-signing-key`` answers) or is fetched from ``--url``'s well-known
route. Exit status: 0 valid, 1 invalid signature, 2 usage error (a missing or malformed file,
no key). Torch-free: it reads the report as plain JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

WELL_KNOWN = "/.well-known/bulwark-signing-key"
VALID, INVALID, USAGE = 0, 1, 2


class UsageError(Exception):
    """Why verification could not be attempted (exit status 2)."""


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(
        name,
        help=help_text,
        description="Check the Ed25519 signature of a report saved from "
        "GET /v1/jobs/{id}/report. Exit status: 0 valid, 1 invalid, 2 usage error.",
    )
    parser.add_argument("report", type=Path, metavar="REPORT.json")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--public-key",
        type=Path,
        metavar="FILE",
        help="the deployment's public key: a PEM, or the JSON of " + WELL_KNOWN,
    )
    source.add_argument(
        "--url", help=f"the deployment's base URL; the key is fetched from its {WELL_KNOWN}"
    )
    parser.set_defaults(run=run)


def fetch_key_text(url: str) -> str:
    """The well-known route's JSON at ``url`` (a deployment's base URL)."""
    import httpx

    try:
        response = httpx.get(url.rstrip("/") + WELL_KNOWN, timeout=30, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise UsageError(f"cannot fetch the signing key from {url}: {error}") from error
    return response.text


def read_report_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(body, signature) of a saved report response."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from error
    except ValueError as error:
        raise UsageError(f"{path} is not JSON: {error}") from error
    if not isinstance(document, dict):
        raise UsageError(f"{path} is not a report response (a JSON object)")
    body, signature = document.get("body"), document.get("signature")
    if not isinstance(body, dict) or not isinstance(signature, dict):
        route = "GET /v1/jobs/{id}/report"
        raise UsageError(f"{path} has no body and signature: save the whole answer of {route}")
    return body, signature


def run(args: argparse.Namespace) -> int:
    from common.signing import key_id, read_public_key, verify_report

    try:
        body, signature = read_report_file(args.report)
        if args.public_key is not None:
            try:
                key_text = args.public_key.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise UsageError(f"cannot read {args.public_key}: {error}") from error
        else:
            key_text = fetch_key_text(args.url)
        try:
            public_key = read_public_key(key_text)
        except ValueError as error:
            raise UsageError(f"no Ed25519 public key in the key source: {error}") from error
    except UsageError as error:
        print(f"error: {error}")
        return USAGE
    if verify_report(body, signature, public_key):
        print(f"valid: signed by key {key_id(public_key)}")
        return VALID
    expected = key_id(public_key)
    if signature.get("key_id") != expected:
        print(
            f"invalid signature: the report names key {signature.get('key_id')}, "
            f"the given key is {expected}"
        )
    else:
        print(f"invalid signature: the report does not match key {expected}'s signature")
    return INVALID
