"""Helpers of the reliability suite (no fixtures): a private Postgres cluster and Redis server
on free loopback ports, `bulwark serve` and `bulwark worker` as real processes, polling.

Everything here is started by this suite and stopped by the pid it started, never by name:
the shared Postgres (5432) and Redis (6379) of the machine are never touched.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from common.models import Job

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"

# The pre-training every fault interrupts: long enough (4 epochs of a few seconds) to be caught
# after its first epoch, short enough for CI. Adversarial training crosses every piece of state
# a resume restores (model, optimizer, scheduler, generator).
PRETRAIN = {
    "dataset": "digits",
    "arch": "convnet",
    "recipe": "quick",
    "defense": "at",
    "epochs": 4,
    "seed": 0,
    "overrides": {"pgd_steps": 2, "batch_size": 64},
}
EPOCHS = 4

# The extractor the audits attack: a short undefended pre-training (the audit is what is under
# test, not the model).
AUDITED_PRETRAIN = {**PRETRAIN, "defense": "none", "epochs": 1, "overrides": {"batch_size": 64}}
# The audit every audit fault interrupts: one task (the service's fan-out is off, see
# ``service_env``; its own kill test is in tests/service/test_service_fanout.py), FC then BP.
# FC is the first attack to finish and be kept (AuditState); BP, with its 10 poisons, still
# crafts for several seconds after it, long enough to be caught mid-way, then on resumption.
AUDIT_ATTACKS = ("fc", "bp")
AUDIT = {
    "dataset": "digits",
    "attacks": list(AUDIT_ATTACKS),
    "attack_settings": {"bp": {"poisons": 10}},
    "pairs": [[0, 7]],
    "targets_per_pair": 2,
    "iterations": 1000,
    "reference": "none",
    "seed": 0,
    "overrides": {
        "retrain_epochs": 5,
        "retrain_milestones": [],
        "eval_images": 100,
        "screen_images": 0,
    },
}
# The file the audit's first attack leaves once it is done (``core.audit.AuditState``).
FIRST_ATTACK_STATE = f"model-{AUDIT_ATTACKS[0]}-round0.pt"


# How the suite's services are tuned: short leases and a 1 s sweep, so that a dead worker's job
# is taken over within seconds (production: 60 s and 30 s).
LEASE_SECONDS = 6.0
SWEEP_SECONDS = 1.0
REQUEUE_QUEUED_AFTER_SECONDS = 4.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it is truthy (returned) or ``timeout`` s pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop_pid(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 30) -> None:
    """Stop one process this suite started: ``sig``, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian's layout), or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


class PostgresCluster:
    """A throw-away cluster (initdb) in ``folder``, served by one ``postgres`` process on a free
    port with trust auth; ``stop`` and ``start`` make an outage. Run as the ``postgres`` user
    where this process is root (initdb refuses root)."""

    def __init__(self, folder: Path) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL server under /usr/lib/postgresql/*/bin")
        self.bin_dir, self.folder = bin_dir, folder
        self.data, self.log = folder / "data", folder / "postgres.log"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root with no 'postgres' user for initdb") from None
            self.user = "postgres"
            shutil.chown(folder, user="postgres")
        subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=self.user,
            timeout=120,
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/postgres"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            [
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.folder),  # its socket stays in our folder
                "-c",
                f"listen_addresses={HOST}",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            user=self.user,
            start_new_session=True,
        )
        wait_for(self._accepts, timeout=60, what="the suite's Postgres to accept connections")

    def _accepts(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"postgres exited: {self.log.read_text(errors='replace')[-2000:]}")
        with socket.socket() as probe:
            probe.settimeout(1)
            if probe.connect_ex((HOST, self.port)) != 0:
                return False
        import psycopg

        try:
            psycopg.connect(
                host=HOST, port=self.port, user="postgres", dbname="postgres", connect_timeout=2
            ).close()
        except psycopg.OperationalError:  # still starting up
            return False
        return True

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster it started): clients are disconnected."""
        if self.process is not None:
            stop_pid(self.process, signal.SIGINT, wait=60)


class RedisServer:
    """``redis-server`` on a free port with no persistence (a restart loses every message)."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server on PATH")
        self.binary, self.folder = binary, folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=(self.folder / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        import redis

        client = redis.Redis(host=HOST, port=self.port, socket_timeout=2)

        def pings() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(pings, timeout=30, what="the suite's Redis")
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            stop_pid(self.process, signal.SIGTERM)


def service_env(*, database_url: str, broker_url: str, data_dir: Path) -> dict[str, str]:
    """The environment of the suite's `bulwark serve` and `bulwark worker` processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULWARK_")}
    env.pop("DATABASE_URL", None)
    env.pop("BROKER_URL", None)
    cache = os.environ.get("BULWARK_CACHE_DIR")
    return {
        **env,
        **({"BULWARK_CACHE_DIR": cache} if cache else {}),
        "DATABASE_URL": database_url,
        "BROKER_URL": broker_url,
        "BULWARK_DATA_DIR": str(data_dir),
        "BULWARK_LEASE_SECONDS": str(LEASE_SECONDS),
        "BULWARK_SWEEP_INTERVAL_SECONDS": str(SWEEP_SECONDS),
        "BULWARK_REQUEUE_QUEUED_AFTER_SECONDS": str(REQUEUE_QUEUED_AFTER_SECONDS),
        "BULWARK_PROGRESS_INTERVAL_SECONDS": "0",
        # Redis's own redelivery must not be what recovers jobs here: the sweep is under test.
        "BULWARK_VISIBILITY_TIMEOUT_SECONDS": "3600",
        "BULWARK_MAX_ATTEMPTS": "3",
        # An audit runs as one task here: a killed audit must resume from its own state files.
        "BULWARK_AUDIT_FAN_OUT": "false",
        # One torch thread per job: the same arithmetic in every run (the weights of a resumed
        # run are compared bit for bit with an uninterrupted one's), and 2 cores shared fairly.
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }


class ServiceProcess:
    """A ``bulwark`` command (``serve`` or ``worker``) in its own process group."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bulwark.cli", *args],
            cwd=ROOT,
            env=env,
            start_new_session=True,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal_group(self, sig: int) -> None:
        """``sig`` to the process group this object started (the worker and its pool)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process and its children: a machine that dies mid-job."""
        self.signal_group(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Worker(ServiceProcess):
    def __init__(self, env: dict[str, str], log: Path) -> None:
        super().__init__(
            ["worker", "--loglevel=INFO", f"--hostname=rel-{uuid.uuid4().hex[:6]}@%h"], env, log
        )

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the worker exited: {self.output()[-3000:]}")
        return " ready." in self.output()

    def holds(self, job_worker: str | None) -> bool:
        """Whether ``job_worker`` (a job row's ``worker``: host:pid of a pool child) is one of
        this worker's processes."""
        if not job_worker:
            return False
        pid = int(job_worker.rsplit(":", 1)[1])
        try:
            return os.getpgid(pid) == self.process.pid
        except ProcessLookupError:
            return False

    def ran(self, job_id: str, run: str) -> bool:
        """Whether one of this worker's pool children claimed the job as ``run`` (a job row's
        ``worker``). Read from its log (``run_job`` logs each claim): the child has exited
        once the job ended, so its process group can no longer be asked."""
        claim = rf"job {re.escape(job_id)} \([\w-]+\) attempt \d+ on {re.escape(run)}$"
        return re.search(claim, self.output(), re.MULTILINE) is not None


def job_row(db: Engine, job_id: str) -> Job:
    with Session(db) as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


def model_sha256(db: Engine, job: Job) -> str:
    assert job.result_model_id is not None, (job.status, job.error)
    with db.connect() as connection:
        return str(
            connection.execute(
                text("SELECT sha256 FROM models WHERE id = :id"), {"id": job.result_model_id}
            ).scalar_one()
        )


def submit_pretrain(client: httpx.Client, **changes: Any) -> str:
    response = client.post("/v1/jobs/pretrain", json={**PRETRAIN, **changes})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


@dataclass(frozen=True)
class UninterruptedAudit:
    model_id: str  # the extractor every audit fault audits
    rows: dict[str, list[dict[str, Any]]]  # its report's rows per attack, run without a fault


def submit_audit(client: httpx.Client, model_id: str, **changes: Any) -> str:
    response = client.post("/v1/jobs/audit", json={**AUDIT, "model_id": model_id, **changes})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def audit_state_file(env: dict[str, str], job_id: str, name: str = FIRST_ATTACK_STATE) -> Path:
    """Where a running audit keeps a finished attack: its work dir (``worker.tasks``
    ``job_work_dir``, under the data dir that every worker of the suite shares)."""
    return Path(env["BULWARK_DATA_DIR"]) / "work" / job_id / "audit-state" / name


def report_rows(client: httpx.Client, job_id: str) -> dict[str, list[dict[str, Any]]]:
    """The per-instance rows of each attack of an audit's report, as the tenant reads them."""
    response = client.get(f"/v1/jobs/{job_id}/report")
    assert response.status_code == 200, response.text
    attacks = response.json()["body"]["attacks"]
    return {name: result["rows"] for name, result in attacks.items()}
