"""Service settings, read from the environment (and ``.env``) once per process.

With no ``DATABASE_URL`` and no ``BROKER_URL`` the service runs embedded: a SQLite file and a
filesystem Celery broker under ``BULWARK_DATA_DIR``, so that it works on a bare machine. With
``DATABASE_URL=postgresql+psycopg://...`` and ``BROKER_URL=redis://...`` it is the production
service.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DAY = 24 * 3600


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", env_prefix="BULWARK_")

    environment: Literal["local", "production"] = "local"
    data_dir: Path = Field(
        Path.home() / ".bulwark",
        description="embedded database, broker, artifacts and work directories live here",
    )
    # Unprefixed names, as every deployment tool spells them.
    database_url: str | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "BULWARK_DATABASE_URL")
    )
    broker_url: str | None = Field(
        None, validation_alias=AliasChoices("BROKER_URL", "BULWARK_BROKER_URL")
    )
    artifact_dir: Path | None = None  # default: data_dir / "artifacts"
    work_dir: Path | None = None  # resumable training state; default: data_dir / "work"
    # Named datasets are read from <datasets_dir>/<name> where that folder exists; otherwise
    # from the core's default place (digits is bundled; fashion-mnist is Debian's package).
    datasets_dir: Path | None = None

    queue: str = "gpu"  # the Celery queue GPU workers consume
    # The API accepts .onnx uploads only where this is set: the deployment's workers have the
    # `onnx` extra with a torchvision that imports (docker/: the worker image). Elsewhere an
    # .onnx upload answers 415 pointing to torch.export.
    onnx_enabled: bool = False
    max_upload_bytes: int = Field(1 << 30, ge=1)  # 1 GiB: a ResNet-50 is about 100 MB
    # Any request body but an upload (JSON): api.limits caps it before authentication.
    max_json_body_bytes: int = Field(1 << 20, ge=1)
    # A job's lease: a worker renews it every lease_seconds / 3 while it runs; a running job
    # whose lease ran out belongs to a dead worker and may be taken over.
    lease_seconds: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1)  # a job that crashed its worker this often fails
    # Every worker sweeps the jobs table this often (worker.jobs.Sweeper): a running job whose
    # lease ran out is re-queued, so a dead worker's job is taken over within about
    # lease_seconds + sweep_interval_seconds; a queued job not updated for
    # requeue_queued_after_seconds has its message re-sent (a restarted Redis lost it).
    sweep_interval_seconds: float = Field(30.0, gt=0)
    requeue_queued_after_seconds: float = Field(600.0, gt=0)
    progress_interval_seconds: float = Field(2.0, ge=0)  # at most one progress write per interval
    # An audit of two or more attack parts (per attack, and per attack on the reference), not
    # sequential, runs its parts as ``audit-part`` jobs on any free worker (worker.tasks).
    audit_fan_out: bool = True
    # ... when its crafting work (iterations x instances x poisons) is at least this: each
    # part is a process that loads the model and data again (seconds), so below it one task
    # is faster (docs/performance.md "Audits across workers").
    audit_fan_out_min_work: int = Field(10_000, ge=0)
    task_soft_time_limit_seconds: int = Field(3 * DAY, ge=1)
    task_time_limit_seconds: int = Field(3 * DAY + 600, ge=1)
    # Redis redelivers a message that was not acknowledged within this time: it must be
    # longer than the longest job, or a second worker would start a running job.
    visibility_timeout_seconds: int = Field(3 * DAY + 3600, ge=1)
    public_url: str = "http://127.0.0.1:8000"  # used in printed download links
    # The deployment's Ed25519 private key (PEM, PKCS8) that signs audit reports; read by the
    # API only. Unset: <data_dir>/signing-key.pem, created on first use (refused in production).
    signing_key_file: Path | None = None
    # Webhooks (docs/webhooks.md): the API's delivery pump polls every webhook_poll_seconds;
    # a failed attempt is retried after backoff * 2**(attempt - 1) s (at most backoff_max),
    # and a delivery is ``failed`` after webhook_max_attempts.
    webhook_max_attempts: int = Field(12, ge=1)
    webhook_backoff_seconds: float = Field(1.0, gt=0)
    webhook_backoff_max_seconds: float = Field(600.0, gt=0)
    webhook_timeout_seconds: float = Field(5.0, gt=0)
    webhook_poll_seconds: float = Field(0.5, gt=0)
    # Loopback, private, link-local and multicast targets are refused unless this is set
    # (a tenant's URL must not reach the deployment's own network).
    webhook_allow_private_targets: bool = False
    # API keys are stored as HMAC-SHA256(key_secret, key) (api.services.tenants): a database
    # dump alone names no key. Unset: <data_dir>/key-secret, created on first use with mode
    # 0600 (refused in production, as the signing key is).
    key_secret: SecretStr | None = None
    # A status poll (GET /v1/jobs/{id}) trusts a key this API process authenticated within
    # auth_cache_seconds (api.services.tenants.KeyCache): a key revoked elsewhere can still
    # read job states here that long. 0: every request looks its key up.
    auth_cache_seconds: float = Field(5.0, ge=0, le=300)
    # Abuse limits (api.ratelimit, docs/service.md "Keys, limits and quotas"); 0 turns each
    # off. Per tenant: a token bucket of rate_limit_burst requests refilled at
    # rate_limit_per_second (in Redis when the broker is Redis, else in the API process).
    rate_limit_per_second: float = Field(20.0, ge=0)
    rate_limit_burst: int = Field(200, ge=0)
    # Per client IP: after auth_failure_limit 401s within auth_failure_window_seconds, 429
    # until the window ends.
    auth_failure_limit: int = Field(30, ge=0)
    auth_failure_window_seconds: float = Field(300.0, gt=0)
    # Quotas per tenant: queued + running jobs (429: retry once one finishes), and bytes of
    # stored models + datasets (413: delete something first).
    max_active_jobs: int = Field(20, ge=0)
    max_stored_bytes: int = Field(50 << 30, ge=0)  # 50 GiB
    # Job sizes (422 naming the biggest factor): an audit's iterations x targets x poisons,
    # a pre-training's epochs x images.
    max_audit_work: int = Field(50_000_000, ge=0)  # the paper: 500 x 50 x 5 = 125,000
    max_pretrain_work: int = Field(500_000_000, ge=0)  # the paper: 120 x 48,000
    # GPUs one pre-training may ask for ("devices", core.distributed): a worker runs such a
    # job only if its machine has that many (docs/performance.md). Above: 422.
    max_devices_per_job: int = Field(1, ge=1, le=64)
    # The API's database pool: pool + overflow should cover the API's threadpool (40 threads,
    # AnyIO's default), so no request waits for a connection while a thread is free.
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(30, ge=0)
    db_pool_timeout_seconds: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _production_needs_real_services(self) -> Self:
        if self.environment == "production" and (not self.database_url or not self.broker_url):
            raise ValueError(
                "BULWARK_ENVIRONMENT=production needs DATABASE_URL (postgresql+psycopg://...) "
                "and BROKER_URL (redis://...); the SQLite and filesystem defaults are for one "
                "machine only"
            )
        return self

    @property
    def embedded(self) -> bool:
        return self.database_url is None and self.broker_url is None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'bulwark.sqlite3'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or self.data_dir / "artifacts"

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.data_dir / "work"


@lru_cache
def get_settings() -> Settings:
    return Settings()
