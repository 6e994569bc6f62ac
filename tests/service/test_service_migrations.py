"""Alembic: upgrade head, an autogenerate diff that comes out empty, downgrade base."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from servicekit import POSTGRES, postgres_unreachable, schema_url
from sqlalchemy import inspect, text

from common import migrate
from common.db import make_engine
from common.models import Base


def _diff(engine) -> list:  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def _round_trip(url: str) -> None:
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        tables = set(inspect(engine).get_table_names())
        assert {"tenants", "api_keys", "models", "jobs", "reports"} <= tables
        assert _diff(engine) == []
        migrate.downgrade(engine, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(engine)  # and back up again: downgrade left nothing behind
        assert _diff(engine) == []
    finally:
        engine.dispose()


def test_postgres_upgrade_autogenerate_empty_downgrade() -> None:
    reason = postgres_unreachable()
    if reason:
        pytest.skip(reason)
    schema = f"bulwark_migrate_{uuid.uuid4().hex[:10]}"
    admin = make_engine(POSTGRES)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        _round_trip(schema_url(schema))
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_sqlite_upgrade_autogenerate_empty_downgrade(tmp_path: Path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'bulwark.sqlite3'}")


def test_revision_files_are_date_prefixed() -> None:
    versions = Path(migrate.ROOT, "migrations", "versions")
    names = [p.name for p in versions.glob("*.py")]
    assert names
    assert all(name[:4].isdigit() and name[4] == "_" and name[7] == "_" for name in names), names
