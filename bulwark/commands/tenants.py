"""``bulwark tenants``: create tenants (printing their API key once), list them and their keys,
revoke keys, and issue a tenant a new key."""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports the service code only when a command runs
    from sqlalchemy.orm import Session

    from common.settings import Settings


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a tenant and print its API key once")
    create.add_argument("name")
    actions.add_parser("list", help="list tenants")
    keys = actions.add_parser("keys", help="list a tenant's API keys (ids, prefixes, state)")
    keys.add_argument("name")
    revoke = actions.add_parser(
        "revoke", help="revoke a tenant's API keys (all, or --key-id): 401 from then on"
    )
    revoke.add_argument("name")
    revoke.add_argument("--key-id", type=uuid.UUID, help="only this key (see `tenants keys`)")
    new_key = actions.add_parser("new-key", help="issue a tenant one more API key, printed once")
    new_key.add_argument("name")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from api.errors import ConflictError, NotFoundError
    from api.services import tenants as tenant_service
    from common.db import make_engine, make_session_factory
    from common.settings import get_settings

    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            try:
                return _act(args, session, settings)
            except (ConflictError, NotFoundError, tenant_service.KeySecretError) as error:
                print(f"bulwark tenants {args.action}: {error}", file=sys.stderr)
                return 1
    finally:
        engine.dispose()


def _act(args: argparse.Namespace, session: Session, settings: Settings) -> int:
    from api.services import tenants as tenant_service

    if args.action == "create":
        created = tenant_service.create_tenant(session=session, name=args.name, settings=settings)
        print(f"tenant {created.tenant.name} ({created.tenant.id})")
        print(f"API key (shown once, store it now): {created.api_key}")
    elif args.action == "list":
        for tenant in tenant_service.list_tenants(session=session):
            print(f"{tenant.id}  {tenant.name}  created {tenant.created_at:%Y-%m-%d}")
    elif args.action == "keys":
        tenant = tenant_service.tenant_by_name(session=session, name=args.name)
        for key in tenant_service.list_keys(session=session, tenant=tenant):
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never"
            print(f"{key.id}  {key.prefix}...  {state}  last used {used}")
    elif args.action == "revoke":
        revoked = tenant_service.revoke_keys(session=session, name=args.name, key_id=args.key_id)
        if not revoked:
            print(f"tenant {args.name} has no active key to revoke")
        for key in revoked:
            print(f"revoked {key.id} ({key.prefix}...)")
    else:
        created_key = tenant_service.new_key_for(session=session, name=args.name, settings=settings)
        print(f"key {created_key.key.id} for tenant {args.name}")
        print(f"API key (shown once, store it now): {created_key.api_key}")
    return 0
