"""``bulwark db``: run the Alembic migrations (the only way the schema is made)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(
        name,
        help=help_text,
        description="Migrate the database named by DATABASE_URL (default: the embedded "
        "SQLite file under BULWARK_DATA_DIR).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    upgrade = actions.add_parser("upgrade", help="migrate up (default: to the newest revision)")
    upgrade.add_argument("revision", nargs="?", default="head")
    downgrade = actions.add_parser("downgrade", help="migrate down to REVISION ('base': empty)")
    downgrade.add_argument("revision")
    actions.add_parser("current", help="print the database's revision")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from alembic import command

    from common import migrate
    from common.db import make_engine
    from common.settings import get_settings

    url = get_settings().resolved_database_url
    if args.action == "current" and _missing_sqlite_file(url):
        # Read-only: opening a SQLite URL would create the file (and its folder).
        print(f"database {url}: does not exist (nothing created; `bulwark db upgrade` makes it)")
        return 1
    engine = make_engine(url)
    try:
        if args.action == "upgrade":
            migrate.upgrade(engine, args.revision)
        elif args.action == "downgrade":
            migrate.downgrade(engine, args.revision)
        else:
            with engine.connect() as connection:
                config = migrate.alembic_config()
                config.attributes["connection"] = connection
                command.current(config)
    finally:
        engine.dispose()
    print(f"database {engine.url.render_as_string(hide_password=True)}: {args.action} done")
    return 0


def _missing_sqlite_file(url: str) -> bool:
    from pathlib import Path

    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database
    if not parsed.drivername.startswith("sqlite") or not database or database == ":memory:":
        return False
    return not Path(database).exists()
