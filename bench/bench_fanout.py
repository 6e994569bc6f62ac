"""The same audit on one worker and on two: wall time end to end, the speed-up, and whether
the reports' rows are identical (an audit fans out per attack into ``audit-part`` jobs).

Runs ``bulwark serve --no-worker`` on Postgres and Redis (a fresh schema, dropped at the end;
the Redis database given is flushed) and ``bulwark worker --concurrency 1`` processes with one
torch thread each (``OMP_NUM_THREADS=1``). Two digits ConvNets are pre-trained first (the
audited model and its named reference), so the audit has 2 x attacks parts of equal pairs of
cost and no reference is pre-trained inside a timed run.

    .venv/bin/python bench/bench_fanout.py --iterations 1200

``--baseline`` also times the audit in one task (fan-out off, one worker).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from benchkit import Process, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TERMINAL = {"succeeded", "failed", "cancelled"}


def machine_line() -> str:
    """CPU model, the flags that matter to torch's kernels, cores, load and a matmul rate."""
    import torch

    from bench.bench_attacks import matmul_rate

    model, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    torch.set_num_threads(1)
    rate = matmul_rate(torch.float32)
    load = os.getloadavg()
    return (
        f"{model}; {os.cpu_count()} cores; flags {' '.join(wanted) or 'none of avx2/avx512'}; "
        f"matmul fp32 1 thread {rate / 1e9:.1f} GFLOP/s; load {load[0]:.2f} {load[1]:.2f}"
    )


def start_workers(count: int, env: dict[str, str], logs: Path, tag: str) -> list[Process]:
    workers = [
        Process(
            ["worker", "--concurrency", "1", f"--hostname=bench-{tag}-{i}@%h"],
            env,
            logs / f"worker-{tag}-{i}.log",
        )
        for i in range(count)
    ]
    for worker in workers:
        wait_for(lambda w=worker: " ready." in w.output(), timeout=120, what="a worker")
    return workers


def run_job(http: httpx.Client, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    response = http.post(path, json=body)
    response.raise_for_status()
    job_id = response.json()["id"]

    def finished() -> dict[str, Any] | None:
        job: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    job: dict[str, Any] = wait_for(finished, timeout=timeout, what=f"job {job_id}", interval=0.2)
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
    return job


def report_rows(http: httpx.Client, job_id: str) -> dict[str, Any]:
    body = http.get(f"/v1/jobs/{job_id}/report").json()["body"]
    return {
        "model": {name: result["rows"] for name, result in body["attacks"].items()},
        "reference": {
            name: result["rows"]
            for name, result in (body.get("reference") or {})["attacks"].items()
        },
        "union": body.get("union"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/3", help="flushed first")
    parser.add_argument("--attacks", default="fc,bp")
    parser.add_argument("--iterations", type=int, default=1200)
    parser.add_argument("--targets-per-pair", type=int, default=2)
    parser.add_argument("--baseline", action="store_true", help="also time fan-out off")
    args = parser.parse_args(argv)

    import redis
    from sqlalchemy import text

    from api.services.tenants import create_tenant
    from common import migrate
    from common.db import make_engine, make_session_factory
    from common.settings import Settings

    print(machine_line(), flush=True)
    schema = f"bench_fanout_{uuid.uuid4().hex[:8]}"
    database_url = f"{args.postgres}?options=-csearch_path%3D{schema}"
    admin = make_engine(args.postgres)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    data_dir = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    processes: list[Process] = []
    try:
        engine = make_engine(database_url)
        migrate.upgrade(engine)
        redis.Redis.from_url(args.redis).flushdb()
        settings = Settings(DATABASE_URL=database_url, BROKER_URL=args.redis, data_dir=data_dir)
        with make_session_factory(engine)() as session:
            key = create_tenant(session=session, name="bench", settings=settings).api_key
        engine.dispose()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BULWARK_")}
        env |= {
            "DATABASE_URL": database_url,
            "BROKER_URL": args.redis,
            "BULWARK_DATA_DIR": str(data_dir),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }
        port = free_port()
        serve = Process(
            ["serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port)],
            env,
            data_dir / "serve.log",
        )
        processes.append(serve)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:

            def healthy() -> bool:
                try:
                    return http.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, timeout=60, what="bulwark serve")
            workers = start_workers(1, env, data_dir, "setup")
            processes += workers
            pretrain = {
                "dataset": "digits",
                "arch": "convnet",
                "defense": "none",
                "recipe": "quick",
            }
            model = run_job(
                http, "/v1/jobs/pretrain", {**pretrain, "epochs": 1, "name": "audited"}, 300
            )
            reference = run_job(
                http,
                "/v1/jobs/pretrain",
                {**pretrain, "epochs": 1, "name": "reference", "seed": 1},
                300,
            )
            for worker in workers:
                worker.stop()
            audit = {
                "model_id": model["result_model_id"],
                "reference": reference["result_model_id"],
                "dataset": "digits",
                "attacks": args.attacks.split(","),
                "pairs": [[0, 7], [2, 1]],
                "targets_per_pair": args.targets_per_pair,
                "iterations": args.iterations,
                "overrides": {"retrain_epochs": 5, "retrain_milestones": [], "eval_images": 100},
            }
            runs = [("one worker", 1, env), ("two workers", 2, env)]
            if args.baseline:
                runs.append(("one task (fan-out off)", 1, env | {"BULWARK_AUDIT_FAN_OUT": "0"}))
            seconds: dict[str, float] = {}
            rows: dict[str, Any] = {}
            for label, count, run_env in runs:
                workers = start_workers(count, run_env, data_dir, label.split()[0])
                processes += workers
                load = os.getloadavg()[0]
                started = time.perf_counter()
                job = run_job(http, "/v1/jobs/audit", audit, 3600)
                seconds[label] = time.perf_counter() - started
                rows[label] = report_rows(http, job["id"])
                print(
                    f"{label}: {seconds[label]:.1f} s end to end (load before {load:.2f})",
                    flush=True,
                )
                for worker in workers:
                    worker.stop()
        speedup = seconds["one worker"] / seconds["two workers"]
        same = all(value == rows["one worker"] for value in rows.values())
        parts = len(args.attacks.split(",")) * 2
        print(
            f"audit: digits ConvNet, {args.attacks} on the model and its reference ({parts} "
            f"parts), {args.iterations} iterations, {2 * args.targets_per_pair} instances"
        )
        print(f"speed-up two workers / one: {speedup:.2f}x; reports' rows identical: {same}")
        if args.baseline:
            ratio = seconds["one task (fan-out off)"] / seconds["two workers"]
            print(f"speed-up two workers / one task without fan-out: {ratio:.2f}x")
        print(f"load after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        return 0 if same else 1
    finally:
        for process in processes:
            process.stop()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
