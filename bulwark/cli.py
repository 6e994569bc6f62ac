"""``bulwark``: one command, sub-commands registered here and imported lazily."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module under bulwark.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("pretrain", "pre-train a feature extractor with a defense"),
    "audit": ("audit", "run FC, CP and BP against an extractor and write an ASR report"),
    "serve": ("serve", "serve the HTTP API (and, embedded, a worker beside it)"),
    "worker": ("worker", "start a Celery worker on the GPU queue"),
    "tenants": ("tenants", "create tenants and their API keys"),
    "db": ("db", "migrate the database (Alembic)"),
    "verify": ("verify", "check the deployment's signature on a saved audit report"),
    "demo": ("demo", "run the whole service end to end on a bundled dataset"),
    "remote": ("remote", "talk to a remote Bulwark service: submit, watch, get, upload"),
}


def package_version() -> str:
    """The installed distribution's version (``0+unknown`` in a never-installed tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bulwark")
    except PackageNotFoundError:
        return "0+unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="bulwark", description="Bulwark: robust pre-training and poisoning audits."
    )
    parser.add_argument("--version", action="version", version=f"bulwark {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen command's module is imported (to build its full parser); the others
    # are listed by name so that --help works without importing torch or the web stack.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        if name == chosen:
            module = importlib.import_module(f"bulwark.commands.{module_name}")
            module.add_parser(sub, name, help_text)
        else:
            sub.add_parser(name, help=help_text)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
