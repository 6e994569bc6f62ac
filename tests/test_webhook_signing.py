"""Webhook signatures and target checks, without services: what a receiver's check accepts
and refuses, and which URLs a webhook may name."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from pathlib import Path
from typing import Any

import pytest

from common.models import JobStatus
from common.webhooks import (
    EVENTS,
    SECRET_PREFIX,
    WebhookTargetError,
    body_bytes,
    check_target,
    event_for,
    new_secret,
    sign,
    verify_signature,
)

SECRET = "whsec_test-secret"
BODY = body_bytes({"event": "job.succeeded", "job": {"id": "j", "status": "succeeded"}})


def test_every_job_status_has_its_event() -> None:
    assert set(EVENTS) == {event_for(status) for status in JobStatus}


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    header = sign(SECRET, BODY, timestamp=1_700_000_000)
    expected = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"


def test_a_fresh_signature_verifies() -> None:
    assert verify_signature(SECRET, sign(SECRET, BODY), BODY)


def test_a_tampered_body_is_rejected() -> None:
    header = sign(SECRET, BODY)
    assert not verify_signature(SECRET, header, BODY.replace(b"succeeded", b"failed"))
    assert not verify_signature(SECRET, header, BODY + b" ")


def test_another_secret_is_rejected() -> None:
    assert not verify_signature("whsec_other", sign(SECRET, BODY), BODY)


def test_an_old_or_future_timestamp_is_rejected() -> None:
    now = time.time()
    old = sign(SECRET, BODY, timestamp=int(now) - 301)
    assert not verify_signature(SECRET, old, BODY, now=now)
    assert verify_signature(SECRET, old, BODY, tolerance_s=600, now=now)
    future = sign(SECRET, BODY, timestamp=int(now) + 301)
    assert not verify_signature(SECRET, future, BODY, now=now)


def test_a_replayed_signature_with_a_new_timestamp_is_rejected() -> None:
    # The timestamp is signed: moving it forward to pass the tolerance breaks the HMAC.
    old = sign(SECRET, BODY, timestamp=int(time.time()) - 3600)
    digest = old.split("v1=")[1]
    assert not verify_signature(SECRET, f"t={int(time.time())},v1={digest}", BODY)


@pytest.mark.parametrize(
    "header",
    # "t={now}": a current timestamp without a signature, filled in when the test runs (in
    # the test's id it would differ between pytest-xdist's processes, which must agree)
    [None, "", "garbage", "t=abc,v1=00", "v1=00", "t={now}", "t=1,v1="],
)
def test_malformed_headers_are_rejected(header: str | None) -> None:
    if header is not None:
        header = header.format(now=int(time.time()))
    assert not verify_signature(SECRET, header, BODY)


def test_any_v1_entry_may_match_while_a_secret_rotates() -> None:
    t = int(time.time())
    header = f"{sign('whsec_old', BODY, timestamp=t)},v1={sign(SECRET, BODY, timestamp=t)[-64:]}"
    assert verify_signature(SECRET, header, BODY)


def test_the_body_is_the_same_bytes_on_every_retry() -> None:
    payload = {"b": [1, 2], "a": {"y": None, "x": "é"}}
    assert body_bytes(payload) == body_bytes(dict(reversed(payload.items())))
    assert body_bytes(payload) == b'{"a":{"x":"\\u00e9","y":null},"b":[1,2]}'


def test_secrets_are_prefixed_random_and_long() -> None:
    secrets = {new_secret() for _ in range(20)}
    assert len(secrets) == 20
    assert all(s.startswith(SECRET_PREFIX) and len(s) >= len(SECRET_PREFIX) + 43 for s in secrets)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://example.com/hook", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("example.com/hook", "only http and https"),
        ("http:///hook", "no host"),
        ("https://user:pw@example.com/hook", "no credentials"),
        ("http://example.com:99999/", "not a valid URL"),
    ],
)
def test_urls_of_the_wrong_form_are_refused_even_when_private_targets_are_allowed(
    url: str, words: str
) -> None:
    with pytest.raises(WebhookTargetError, match=words) as caught:
        check_target(url, allow_private=True)
    assert caught.value.permanent


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.1.2.3/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://[::1]/",
        "http://[fe80::1]/",
        "http://[fd00::1]/",
        "http://[::ffff:127.0.0.1]/",
    ],
)
def test_internal_addresses_are_refused(url: str) -> None:
    with pytest.raises(WebhookTargetError, match="public addresses only") as caught:
        check_target(url, allow_private=False)
    assert caught.value.permanent
    check_target(url, allow_private=True)  # the flag lets a test (or a lab) use them


def test_a_public_address_is_accepted() -> None:
    check_target("https://8.8.8.8/hook", allow_private=False)  # no DNS, no traffic


def test_the_verifier_in_the_docs_agrees_with_verify_signature() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "webhooks.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(code.strip().splitlines()) <= 10
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    verify = namespace["verify"]
    header = sign(SECRET, BODY)
    old = sign(SECRET, BODY, timestamp=int(time.time()) - 301)
    for args in [(header, BODY), (header, BODY + b" "), (old, BODY), ("t=1", BODY)]:
        assert verify(SECRET, *args) == verify_signature(SECRET, *args), args
    assert verify(SECRET, header, BODY)
