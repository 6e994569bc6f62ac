"""``bulwark tenants``: create tenants (printing their API key once) and list them."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a tenant and print its API key once")
    create.add_argument("name")
    actions.add_parser("list", help="list tenants")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from api.errors import ConflictError
    from api.services.tenants import create_tenant, list_tenants
    from common.db import make_engine, make_session_factory
    from common.settings import get_settings

    engine = make_engine(get_settings().resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            if args.action == "create":
                try:
                    created = create_tenant(session=session, name=args.name)
                except ConflictError as error:
                    print(f"bulwark tenants create: {error}", file=sys.stderr)
                    return 1
                print(f"tenant {created.tenant.name} ({created.tenant.id})")
                print(f"API key (shown once, store it now): {created.api_key}")
            else:
                for tenant in list_tenants(session=session):
                    print(f"{tenant.id}  {tenant.name}  created {tenant.created_at:%Y-%m-%d}")
    finally:
        engine.dispose()
    return 0
