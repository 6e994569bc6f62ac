"""Stored, versioned tenant policies over /v1/policy, and a model's verdict badge."""

from __future__ import annotations

import threading
import uuid
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from servicekit import add_model_row, problem, problem_errors
from sqlalchemy import Engine, event, insert
from sqlalchemy.orm import Session

from catalog.policy import DEFAULT_POLICY, Policy
from common import migrate, policies
from common.db import make_engine, make_session_factory
from common.models import Job, JobStatus, Report, StoredPolicy
from core.badge import OUTCOME_COLORS

SVG = "{http://www.w3.org/2000/svg}"
FIRST = {"confidence": 0.9, "default": {"max_asr": 0.2}}
SECOND = {
    "default": {"max_asr": 0.3, "max_asr_above_baseline": 0.1},
    "attacks": {"fc": {"max_asr": 0.05}, "bp": {"max_asr_above_baseline": None}},
}


def test_policies_are_stored_as_versions_and_the_newest_is_in_force(client, make_tenant) -> None:
    tenant = make_tenant("acme")
    first = client.put("/v1/policy", headers=tenant.headers, json=FIRST)
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1 and first.headers["location"] == "/v1/policy/versions/1"
    assert first.json()["policy"]["confidence"] == 0.9
    second = client.put("/v1/policy", headers=tenant.headers, json=SECOND)
    assert second.status_code == 201, second.text
    body = second.json()
    assert body["version"] == 2 and datetime.fromisoformat(body["created_at"]).tzinfo
    # An attack's entry comes back as given: only the fields it overrides (null included).
    assert body["policy"]["attacks"] == SECOND["attacks"]

    current = client.get("/v1/policy", headers=tenant.headers)
    assert current.status_code == 200, current.text
    assert current.json()["version"] == 2 and current.json()["default"] is False
    in_force = Policy.model_validate(current.json()["policy"])
    assert in_force.thresholds_for("fc") == {"max_asr": 0.05, "max_asr_above_baseline": 0.1}
    assert in_force.thresholds_for("bp") == {"max_asr": 0.3}

    listed = client.get("/v1/policy/versions", headers=tenant.headers)
    assert listed.status_code == 200, listed.text
    page = listed.json()
    assert [item["version"] for item in page["items"]] == [2, 1] and page["total"] == 2
    paged = client.get("/v1/policy/versions?limit=1&offset=1", headers=tenant.headers).json()
    assert [item["version"] for item in paged["items"]] == [1] and paged["total"] == 2

    one = client.get("/v1/policy/versions/1", headers=tenant.headers)
    assert one.status_code == 200, one.text
    assert one.json()["version"] == 1
    assert Policy.model_validate(one.json()["policy"]) == Policy.model_validate(FIRST)
    missing = client.get("/v1/policy/versions/3", headers=tenant.headers)
    assert missing.status_code == 404 and "no policy version 3" in problem(missing)["detail"]
    assert client.get("/v1/policy/versions/0", headers=tenant.headers).status_code == 422
    assert client.get("/v1/policy").status_code == 401
    assert client.put("/v1/policy", json=FIRST).status_code == 401


def test_a_tenant_without_a_policy_is_held_to_the_default(client, make_tenant) -> None:
    tenant = make_tenant("fresh")
    current = client.get("/v1/policy", headers=tenant.headers)
    assert current.status_code == 200, current.text
    body = current.json()
    assert body["version"] is None and body["default"] is True
    assert Policy.model_validate(body["policy"]) == DEFAULT_POLICY
    listed = client.get("/v1/policy/versions", headers=tenant.headers).json()
    assert listed["items"] == [] and listed["total"] == 0
    assert client.get("/v1/policy/versions/1", headers=tenant.headers).status_code == 404


def test_an_invalid_policy_is_one_422_naming_every_bad_field(client, make_tenant) -> None:
    tenant = make_tenant("sloppy")
    response = client.put(
        "/v1/policy",
        headers=tenant.headers,
        json={
            "confidence": 0.5,
            "default": {"max_asr": 1.5, "max_asr_above_baseline": "lots"},
            "attacks": {"nope": {"max_asr": 0.1}, "fc": {"max_asr_typo": 0.1}},
            "extra": True,
        },
    )
    assert response.status_code == 422, response.text
    where = {tuple(error["loc"]) for error in problem_errors(response)}
    assert where == {
        ("body", "confidence"),
        ("body", "default", "max_asr"),
        ("body", "default", "max_asr_above_baseline"),
        ("body", "attacks", "nope", "[key]"),
        ("body", "attacks", "fc", "max_asr_typo"),
        ("body", "extra"),
    }
    # A policy that checks nothing, and a body that is not JSON, are refused too.
    empty = client.put("/v1/policy", headers=tenant.headers, json={"default": {}})
    assert empty.status_code == 422 and "at least one threshold" in empty.text
    garbled = client.put(
        "/v1/policy",
        headers={**tenant.headers, "Content-Type": "application/json"},
        content=b"{not json",
    )
    assert garbled.status_code == 422
    # Nothing was stored.
    assert client.get("/v1/policy", headers=tenant.headers).json()["default"] is True


def test_policies_are_tenant_isolated(client, make_tenant) -> None:
    owner, other = make_tenant("owner"), make_tenant("other")
    assert client.put("/v1/policy", headers=owner.headers, json=FIRST).status_code == 201
    assert client.put("/v1/policy", headers=owner.headers, json=SECOND).status_code == 201
    # The other tenant sees none of them and numbers its own versions from 1.
    assert client.get("/v1/policy", headers=other.headers).json()["default"] is True
    assert client.get("/v1/policy/versions", headers=other.headers).json()["total"] == 0
    assert client.get("/v1/policy/versions/1", headers=other.headers).status_code == 404
    mine = client.put("/v1/policy", headers=other.headers, json=SECOND)
    assert mine.status_code == 201 and mine.json()["version"] == 1
    assert client.get("/v1/policy", headers=owner.headers).json()["version"] == 2


def test_concurrent_puts_never_share_a_version(client, make_tenant, clean_db: Engine) -> None:
    tenant = make_tenant("busy")
    puts = 12
    barrier = threading.Barrier(6, timeout=30)

    def put(index: int) -> Any:
        if index < 6:  # the first six start together
            barrier.wait()
        body = {"default": {"max_asr": round(0.01 * (index + 1), 2)}}
        return client.put("/v1/policy", headers=tenant.headers, json=body)

    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(put, range(puts)))
    assert all(r.status_code == 201 for r in responses), [r.text for r in responses]
    versions = sorted(r.json()["version"] for r in responses)
    assert versions == list(range(1, puts + 1))
    # Each version holds the body of the PUT that answered it.
    with Session(clean_db) as session:
        for response in responses:
            stored = policies.policy_version(session, tenant.id, response.json()["version"])
            assert stored == Policy.model_validate(response.json()["policy"])


def test_a_writer_that_loses_the_race_takes_the_next_version(make_tenant, clean_db) -> None:
    """The primary key is the last line: another writer stores the version this one computed
    between its read and its insert; the insert fails and the retry takes the next number."""
    tenant = make_tenant("racy")
    factory = make_session_factory(clean_db)
    with factory() as session:
        policies.store_policy(session, tenant.id, Policy.model_validate(FIRST))
    interloper = Policy.model_validate({"default": {"max_asr": 0.5}})
    with factory() as session:
        raced: list[int] = []

        def store_the_same_version_first(session: Session, *_: Any) -> None:
            pending = [o for o in session.new if isinstance(o, StoredPolicy)]
            if raced or not pending:
                return
            raced.append(pending[0].version)
            with clean_db.begin() as connection:  # another connection: committed first
                connection.execute(
                    insert(StoredPolicy).values(
                        tenant_id=tenant.id,
                        version=pending[0].version,
                        body=interloper.model_dump(mode="json"),
                        created_at=datetime.now(UTC),
                    )
                )

        event.listen(session, "before_flush", store_the_same_version_first)
        row = policies.store_policy(session, tenant.id, Policy.model_validate(SECOND))
        assert raced == [2] and row.version == 3
    with factory() as session:
        assert policies.policy_version(session, tenant.id, 2) == interloper
        assert policies.current_policy(session, tenant.id) == (3, Policy.model_validate(SECOND))
        # A writer that loses every try gives up with a conflict (the API answers 409).
        with pytest.raises(policies.PolicyVersionConflictError):
            policies.store_policy(session, tenant.id, interloper, attempts=0)
        with pytest.raises(LookupError):
            policies.store_policy(session, uuid.uuid4(), interloper)


def test_concurrent_stores_on_sqlite_take_distinct_versions(tmp_path) -> None:
    """Embedded deployments run on SQLite, where the row lock is a no-op: the primary key
    and the retry keep the versions distinct."""
    from api.services.tenants import create_tenant

    engine = make_engine(f"sqlite:///{tmp_path / 'bulwark.sqlite3'}")
    migrate.upgrade(engine)
    factory = make_session_factory(engine)
    with factory() as session:
        tenant_id = create_tenant(session=session, name="embedded").tenant.id
    barrier = threading.Barrier(4, timeout=30)

    def store(index: int) -> int:
        barrier.wait()
        with factory() as session:
            policy = Policy.model_validate({"default": {"max_asr": 0.1 + index / 100}})
            return policies.store_policy(session, tenant_id, policy).version

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            versions = sorted(pool.map(store, range(4)))
        assert versions == [1, 2, 3, 4]
        with factory() as session:
            assert [r.version for r in policies.stored_versions(session, tenant_id)] == [4, 3, 2, 1]
    finally:
        engine.dispose()


# --- the verdict badge ---------------------------------------------------------------------


def add_report(db: Engine, tenant_id: uuid.UUID, model_id: uuid.UUID, **body: Any) -> None:
    """A finished audit's job and report row, the report's body reduced to what the badge
    reads (``verdict``), ``minutes`` after a fixed time."""
    minutes = body.pop("minutes")
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)
    with Session(db) as session:
        job = Job(
            tenant_id=tenant_id,
            kind="audit",
            status=JobStatus.SUCCEEDED,
            spec={},
            model_id=model_id,
            created_at=when,
            updated_at=when,
        )
        session.add(job)
        session.flush()
        session.add(
            Report(
                tenant_id=tenant_id, job_id=job.id, model_id=model_id, body=body, created_at=when
            )
        )
        session.commit()


def verdict(outcome: str) -> dict[str, Any]:
    return {"outcome": outcome, "reason": "r", "checks": [], "confidence": 0.95}


def badge(client: Any, tenant: Any, model_id: uuid.UUID) -> tuple[str, str, ElementTree.Element]:
    """(message, message colour, parsed SVG) of the model's badge."""
    response = client.get(f"/v1/models/{model_id}/badge.svg", headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/svg+xml"
    assert response.headers["cache-control"] == "no-cache"
    root = ElementTree.fromstring(response.text)
    assert root.tag == f"{SVG}svg"
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert texts[:2] == ["bulwark", "bulwark"]  # the label, and its shadow
    assert texts[2] == texts[3]
    (message_box,) = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "message"]
    return texts[2] or "", message_box.get("fill") or "", root


def test_the_badge_shows_the_newest_verdict(client, make_tenant, clean_db) -> None:
    tenant = make_tenant("badged")
    model_id = add_model_row(clean_db, tenant.id)
    message, color, root = badge(client, tenant, model_id)
    assert (message, color) == ("not audited", "#9f9f9f")
    assert root.get("aria-label") == "bulwark: not audited"

    # A report without a verdict (an audit before policies) leaves it not audited.
    add_report(clean_db, tenant.id, model_id, minutes=0, attacks={})
    assert badge(client, tenant, model_id)[:2] == ("not audited", "#9f9f9f")

    expected = {"pass": "#4c1", "fail": "#e05d44", "inconclusive": "#dfb317"}
    assert {k: OUTCOME_COLORS[k] for k in expected} == expected
    for minutes, outcome in enumerate(("fail", "inconclusive", "pass"), start=1):
        add_report(clean_db, tenant.id, model_id, minutes=minutes, verdict=verdict(outcome))
        message, color, root = badge(client, tenant, model_id)
        assert (message, color) == (outcome, expected[outcome])
        # The boxes fit their texts: a longer message gets a wider badge.
        width = float(root.get("width") or 0)
        assert width == pytest.approx(
            sum(
                float(r.get("width") or 0)
                for r in root.iter(f"{SVG}rect")
                if r.get("class") in ("label", "message")
            )
        )
    wide = float(badge(client, tenant, model_id)[2].get("width") or 0)
    add_report(clean_db, tenant.id, model_id, minutes=10, verdict=verdict("inconclusive"))
    assert float(badge(client, tenant, model_id)[2].get("width") or 0) > wide
    # A newer report without a verdict does not hide the newest verdict.
    add_report(clean_db, tenant.id, model_id, minutes=20, attacks={})
    assert badge(client, tenant, model_id)[0] == "inconclusive"
    # Another model of the tenant is not affected by this one's reports.
    assert badge(client, tenant, add_model_row(clean_db, tenant.id))[0] == "not audited"


def test_the_badge_is_tenant_isolated(client, make_tenant, clean_db) -> None:
    owner, other = make_tenant("owner"), make_tenant("other")
    model_id = add_model_row(clean_db, owner.id)
    add_report(clean_db, owner.id, model_id, minutes=0, verdict=verdict("pass"))
    assert badge(client, owner, model_id)[0] == "pass"
    for who in (other.headers, {}):
        response = client.get(f"/v1/models/{model_id}/badge.svg", headers=who)
        assert response.status_code == (404 if who else 401), response.text
    response = client.get(f"/v1/models/{uuid.uuid4()}/badge.svg", headers=owner.headers)
    assert response.status_code == 404
