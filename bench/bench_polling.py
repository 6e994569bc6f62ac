"""Status polling under load: many clients polling GET /v1/jobs/{id} while a worker trains.

What it runs, all on this machine and only on 127.0.0.1:
1. a fresh schema in the Postgres at ``--postgres`` (migrated, dropped at the end) and a
   Redis database (``--redis``, flushed at the start and the end);
2. ``bulwark serve --no-worker`` (the production API: Postgres + Redis, one uvicorn process)
   and one ``bulwark worker``, as separate processes;
3. ``--tenants`` tenants, each submitting a long pre-training of the digits ConvNet (the worker
   runs one, the others wait queued: polls of running and of queued jobs both count);
4. once a job is running, ``--pollers`` concurrent pollers (spread over the tenants) for
   ``--seconds``, each polling its tenant's job every ``--interval`` s with ``If-None-Match``
   (an unchanged job answers 304), as a client that watches progress would.

It prints the latency percentiles of every poll (measured in this process, so they include
its own scheduling on the shared cores), the throughput, the errors (any answer other than
200/304, and transport errors or time-outs) and the machine line (CPU model, flags, measured
float32 matmul rate). The per-tenant rate limit stays on at its default: 200 pollers over 20
tenants poll 10 times a second per tenant, under the default 20 per second.

    .venv/bin/python bench/bench_polling.py                     # 200 pollers, 30 s
    .venv/bin/python bench/bench_polling.py --pollers 60 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchkit import Process, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_sequential import cpu_line  # noqa: E402

HOST = "127.0.0.1"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(group: int) -> float:
    """CPU time so far of every live process in a process group (a worker and its pool)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):  # a process that ended meanwhile
            continue
    return total


class Connection:
    """One keep-alive HTTP/1.1 connection that sends GETs and reads their answers.

    The load generator is this small on purpose: an HTTP client library (httpx) spent about
    7 ms of CPU per poll here, more than the API it measured, on the same two cores. Only what
    this API answers is read: a status line, headers, and a Content-Length body.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        lines = [f"GET {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        answer = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                answer[name.strip().lower()] = value.strip()
        length = int(answer.get("content-length", "0"))
        if length:
            await self.reader.readexactly(length)
        if answer.get("connection", "").lower() == "close":
            await self.close()
        return int(status_line.split()[1]), answer

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def poll(
    host: str,
    port: int,
    jobs: list[tuple[str, str]],
    *,
    pollers: int,
    seconds: float,
    interval: float,
    timeout: float = 10.0,
) -> tuple[list[float], dict[str, int], int]:
    """Latencies (s) of every poll, answers by status or error kind, and the 304 count."""
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    not_modified = 0
    deadline = time.monotonic() + seconds

    async def poller(index: int) -> None:
        nonlocal not_modified
        key, job = jobs[index % len(jobs)]
        connection = Connection(host, port)
        etag: str | None = None
        # Spread the pollers' phases over one interval, as independent clients are.
        await asyncio.sleep(random.uniform(0, interval))
        while time.monotonic() < deadline:
            sent = time.monotonic()
            headers = {"Authorization": f"Bearer {key}"}
            if etag:
                headers["If-None-Match"] = etag
            try:
                code, answer = await asyncio.wait_for(
                    connection.get(f"/v1/jobs/{job}", headers), timeout
                )
                kind = str(code)
                if code == 200:
                    etag = answer.get("etag")
                elif code == 304:
                    not_modified += 1
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as error:
                kind = type(error).__name__
                await connection.close()  # a fresh connection for the next poll
            latencies.append(time.monotonic() - sent)
            outcomes[kind] = outcomes.get(kind, 0) + 1
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - sent)))
        await connection.close()

    await asyncio.gather(*(poller(index) for index in range(pollers)))
    return latencies, outcomes, not_modified


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=1.0, help="s between one's polls")
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--no-matmul", action="store_true", help="skip the matmul rate")
    args = parser.parse_args()
    if not 1 <= args.pollers <= 2000 or not 0 < args.seconds <= 600:
        parser.error("--pollers must be in [1, 2000] and --seconds in (0, 600]")
    if HOST not in args.postgres or HOST not in args.redis:
        parser.error(f"--postgres and --redis must be on {HOST}")

    import redis
    from sqlalchemy import select, text
    from sqlalchemy.orm import Session

    from api.services.tenants import create_tenant
    from common import migrate
    from common.db import make_engine, make_session_factory
    from common.models import Job, JobStatus
    from common.settings import Settings

    schema = f"bench_polling_{uuid.uuid4().hex[:8]}"
    admin = make_engine(args.postgres)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{args.postgres}?options=-csearch_path%3D{schema}"
    broker = redis.Redis.from_url(args.redis)
    broker.flushdb()
    folder = Path(tempfile.mkdtemp(prefix="bench-polling-"))
    services: list[Process] = []
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        settings = Settings(DATABASE_URL=url, BROKER_URL=args.redis, data_dir=folder / "data")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BULWARK_")}
        env.pop("DATABASE_URL", None)
        env.pop("BROKER_URL", None)
        cache = os.environ.get("BULWARK_CACHE_DIR")
        env.update(
            {
                **({"BULWARK_CACHE_DIR": cache} if cache else {}),
                "DATABASE_URL": url,
                "BROKER_URL": args.redis,
                "BULWARK_DATA_DIR": str(settings.data_dir),
                "BULWARK_PROGRESS_INTERVAL_SECONDS": "0.5",
                "OMP_NUM_THREADS": "1",  # the worker takes one core; the API has the other
                "PYTHONPATH": str(ROOT),
            }
        )
        port = free_port()
        base = f"http://{HOST}:{port}"
        services.append(
            Process(
                ["serve", "--no-worker", "--host", HOST, "--port", str(port)],
                env,
                folder / "serve.log",
            )
        )
        services.append(Process(["worker", "--loglevel=WARNING"], env, folder / "worker.log"))
        import httpx

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=90, what="bulwark serve")
        jobs: list[tuple[str, str]] = []
        with make_session_factory(engine)() as session:
            for index in range(args.tenants):
                created = create_tenant(session=session, name=f"poller-{index}", settings=settings)
                answer = httpx.post(
                    f"{base}/v1/jobs/pretrain",
                    headers={"Authorization": f"Bearer {created.api_key}"},
                    json={
                        "dataset": "digits",
                        "arch": "convnet",
                        "defense": "none",
                        "recipe": "quick",
                        "epochs": 500,
                    },
                    timeout=30,
                )
                answer.raise_for_status()
                jobs.append((created.api_key, answer.json()["id"]))

        def running() -> bool:
            with Session(engine) as session:
                return (
                    session.scalar(select(Job.id).where(Job.status == JobStatus.RUNNING))
                    is not None
                )

        wait_for(running, timeout=120, what="the worker to start a job")
        print(f"a job is running; {args.pollers} pollers for {args.seconds:g} s", flush=True)
        api_pid = services[0].process.pid
        api_cpu = cpu_seconds(api_pid)
        worker_pid = services[1].process.pid
        worker_cpu = group_cpu_seconds(worker_pid)  # its group: the pool's child too
        pollers_cpu = time.process_time()
        started = time.monotonic()
        latencies, outcomes, not_modified = asyncio.run(
            poll(
                HOST,
                port,
                jobs,
                pollers=args.pollers,
                seconds=args.seconds,
                interval=args.interval,
            )
        )
        elapsed = time.monotonic() - started
        # The API's own CPU per poll: what the load costs, whatever else shares the cores.
        api_cpu = cpu_seconds(api_pid) - api_cpu
        worker_cpu = group_cpu_seconds(worker_pid) - worker_cpu
        pollers_cpu = time.process_time() - pollers_cpu
        with Session(engine) as session:
            still_running = (
                session.scalar(select(Job.id).where(Job.status == JobStatus.RUNNING)) is not None
            )
        errors = sum(count for kind, count in outcomes.items() if kind not in ("200", "304"))
        total = len(latencies)
        ms = [value * 1000 for value in latencies]
        machine = cpu_line()
        if not args.no_matmul:
            import torch
            from bench_attacks import matmul_rate

            torch.set_num_threads(1)
            machine += f"; float32 matmul {matmul_rate(torch.float32) / 1e9:.1f} GFLOP/s (1 thread)"
        print(f"machine: {machine}; {os.cpu_count()} cores")
        print(
            f"{args.pollers} pollers x {args.seconds:g} s, one poll per {args.interval:g} s each, "
            f"{args.tenants} tenants; worker running a job throughout: {still_running}"
        )
        print(
            f"polls {total}  throughput {total / elapsed:.0f}/s  p50 {percentile(ms, 0.5):.1f} ms  "
            f"p99 {percentile(ms, 0.99):.1f} ms  max {max(ms, default=float('nan')):.1f} ms  "
            f"errors {errors}  304s {not_modified}  answers {dict(sorted(outcomes.items()))}"
        )
        print(
            f"API process CPU {api_cpu:.1f} s over {elapsed:.1f} s: "
            f"{api_cpu / max(1, total) * 1000:.2f} ms per poll; the pollers' own CPU "
            f"{pollers_cpu / max(1, total) * 1000:.2f} ms per poll; the worker's CPU "
            f"{worker_cpu:.1f} s; load average "
            f"{Path('/proc/loadavg').read_text().split()[0]} (the machine is shared)"
        )
        return 0 if errors == 0 else 1
    finally:
        for service in reversed(services):
            service.stop()
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        broker.flushdb()
        broker.close()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
