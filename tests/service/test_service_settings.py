"""Settings: the embedded default, and production refusing it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from common.settings import Settings


def test_production_refuses_the_single_machine_defaults() -> None:
    with pytest.raises(ValidationError, match="production needs DATABASE_URL"):
        Settings(environment="production", BROKER_URL="redis://127.0.0.1:6379/0")
    settings = Settings(
        environment="production",
        DATABASE_URL="postgresql+psycopg://x@y/z",
        BROKER_URL="redis://y:6379/0",
    )
    assert not settings.embedded and settings.resolved_database_url.startswith("postgresql")


def test_no_database_or_broker_means_embedded(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.embedded
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'bulwark.sqlite3'}"
    assert settings.resolved_broker_url == "filesystem://"
    assert settings.resolved_artifact_dir == tmp_path / "artifacts"
