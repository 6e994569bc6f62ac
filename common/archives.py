"""Untrusted ``.zip`` and ``.tar`` archives, for the API and the worker: ``core.archives``.

The rules and the code live in the torch-free ``core.archives`` (standard library only), so
that ``core.datasets.tenant`` can extract with them without importing ``common``; the service
takes them from here, with its other shared pieces.
"""

from __future__ import annotations

from core.archives import (
    ArchiveError,
    ArchiveLimits,
    ArchiveListing,
    ArchiveMember,
    extract_archive,
    inspect_archive,
)

__all__ = [
    "ArchiveError",
    "ArchiveLimits",
    "ArchiveListing",
    "ArchiveMember",
    "extract_archive",
    "inspect_archive",
]
