"""Engines and sessions for Postgres (production) and SQLite (embedded)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, Engine, Result, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, *, pre_ping: bool = True, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys, so that the API
    and the worker process can share the file. ``pre_ping``: a server's pooled connection is
    tested at each checkout (a round trip), so one the server dropped is replaced unseen."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=pre_ping, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session committed on success and rolled back on error."""
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def rows_matched(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE matched (SQLAlchemy types ``execute`` as a plain
    ``Result``; for DML it is a ``CursorResult``, which has the count)."""
    assert isinstance(result, CursorResult)
    return result.rowcount
