"""Sequential audits against full ones: the same verdicts for a fraction of the crafting?

For each of the four defenses of docs/results.md (ConvNet on Fashion-MNIST, pre-trained with
the recipe of tests/test_real_data_verdict.py: 1000 images per class, 6 epochs; the models are
reused from ``--models`` or pre-trained into ``--out/models``), two audits of the same
instances under the default policy (``catalog.policy.DEFAULT_POLICY``), with the reference of
every defense a second undefended model pre-trained from the next seed (``none-twin``, what
the service's automatic reference is: a model audited against itself would compare identical
rows):

- **full**: every instance crafted for every iteration;
- **sequential**: the instances in ``--rounds`` rounds, stopped once a round decides the
  verdict at the Bonferroni-corrected confidence, and every ``--early-stop-every`` iterations
  the instances whose poisons already succeed stop being crafted.

It prints, side by side per defense, both verdicts, the crafting work (poison forward-backward
passes through the extractor, model and reference, counted by the attacks themselves) and its
ratio, the wall time, and the four rows' totals; then the machine (CPU, flags, measured matmul
rate). The target of issue 10: the same verdicts with at most a third of the crafting work.
Figures come only from this run.

    .venv/bin/python bench/bench_sequential.py --out runs/sequential \\
        --data-dir /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_attacks import matmul_rate
from reproduce import Variant, atomic_json, ensure_model, log

from catalog import SplitConfig
from catalog.policy import DEFAULT_POLICY
from core.audit import run_audit
from core.config import audit_config
from core.datasets import load_dataset
from core.device import resolve_precision
from core.report import AuditReport, percent
from core.verdict import decide

DEFENSES = ("none", "pcl", "at", "at-pcl")


def cpu_line() -> str:
    """The CPU model and the flags that decide precision=auto."""
    name, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("?", "", "x86_64"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    shown = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return f"{name}; flags {' '.join(shown) or 'none of avx2/avx512/amx'}"


def total_work(report: AuditReport) -> int:
    """Poison forward-backward passes of every attack, model and reference."""
    work = sum(result.crafting_work for result in report.attacks.values())
    if report.reference is not None:
        work += sum(result.crafting_work for result in report.reference.attacks.values())
    return work


def stop_kind(stopped: str) -> str:
    """What stopped a sequential audit, in two words: a decided look, futility, or the end."""
    if "futility" in stopped:
        return "futility"
    if " decided after " in stopped:
        return stopped.split(" decided after ")[0] + " decided"
    return "every round"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", type=Path, help="reuse <models>/<defense>/ checkpoints")
    parser.add_argument("--defenses", default=",".join(DEFENSES))
    # The audit: tests/test_real_data_verdict.py's (BP on the 3 pairs the model confuses most
    # and a random one, 150 iterations), with more targets per pair, so that a look decides.
    parser.add_argument("--targets-per-pair", type=int, default=40)
    parser.add_argument("--closest-pairs", type=int, default=3)
    parser.add_argument("--random-pairs", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--early-stop-every", type=int, default=25)
    parser.add_argument("--attacks", default="bp")
    # The pre-training recipe, tests/test_real_data_verdict.py's
    parser.add_argument("--arch", default="convnet")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pgd-steps", type=int, default=1)
    parser.add_argument("--pretrain-per-class", type=int, default=1000)
    parser.add_argument("--data-dir")
    parser.add_argument("--device")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out: Path = args.out
    (out / "reports").mkdir(parents=True, exist_ok=True)
    models = args.models or out / "models"
    split = SplitConfig(pretrain=args.pretrain_per_class, retrain=30, pool=30)
    data = load_dataset("fashion-mnist", args.data_dir)
    defenses = args.defenses.split(",")
    # The reference first; then each defense is pre-trained just before its audits, so an
    # interrupted benchmark keeps whole rows.
    twin_args = argparse.Namespace(**{**vars(args), "seed": args.seed + 1})
    ensure_model(Variant("none-twin", "none"), models / "none-twin", data, twin_args, split)

    rows: list[dict[str, Any]] = []
    for defense in defenses:
        ensure_model(Variant(defense, defense), models / defense, data, args, split)
        row: dict[str, Any] = {"defense": defense}
        for mode in ("full", "sequential"):
            path = out / "reports" / f"{defense}-{mode}.json"
            config = audit_config(
                model=str(models / defense),
                dataset="fashion-mnist",
                data_dir=args.data_dir,
                split=split,
                attacks=tuple(args.attacks.split(",")),
                pair_sets=("closest", "random"),
                closest_pairs=args.closest_pairs,
                random_pairs=args.random_pairs,
                targets_per_pair=args.targets_per_pair,
                iterations=args.iterations,
                seed=args.seed,
                device=args.device,
                reference=str(models / "none-twin"),
                eval_images=2000,  # Pre./Re. Acc and the closest pairs on 2000 test images
                screen_images=0,
                sequential=mode == "sequential",
                rounds=args.rounds,
                early_stop_every=args.early_stop_every if mode == "sequential" else 0,
            )
            log(f"{defense} {mode}: {len(config.attacks)} attacks, {config.iterations} iterations")
            started = time.perf_counter()
            report = run_audit(config, dataset=data, policy=DEFAULT_POLICY)
            seconds = time.perf_counter() - started
            report = report.model_copy(update={"verdict": decide(report, DEFAULT_POLICY)})
            report.write(path)
            assert report.verdict is not None
            row[mode] = {
                "verdict": report.verdict.outcome,
                "reason": report.verdict.reason,
                "work": total_work(report),
                "seconds": seconds,
                "instances": len(report.instances),
                "asr": {name: r.headline.rate for name, r in report.attacks.items()},
                "sequential": report.sequential.model_dump() if report.sequential else None,
            }
            log(f"{defense} {mode}: {report.verdict.outcome}, {seconds:.0f} s")
        row["work_ratio"] = row["sequential"]["work"] / row["full"]["work"]
        row["same_verdict"] = row["sequential"]["verdict"] == row["full"]["verdict"]
        rows.append(row)
        atomic_json(out / "results.json", {"rows": rows, "command": " ".join(sys.argv)})

    dtype = resolve_precision("auto", torch.device("cpu"))
    print()
    print(f"CPU: {cpu_line()}; {torch.get_num_threads()} threads, precision auto = {dtype}")
    print(f"matmul: {matmul_rate(dtype) / 1e9:.1f} GFLOP/s ({str(dtype)[6:]})")
    pairs = args.closest_pairs + args.random_pairs
    print(
        f"audit: {args.attacks}, {args.targets_per_pair} targets x {pairs} pairs "
        f"({args.closest_pairs} closest + {args.random_pairs} random), {args.iterations} "
        f"iterations; sequential: {args.rounds} rounds, early stop every "
        f"{args.early_stop_every} iterations; reference: none-twin (the next seed)"
    )
    header = (
        "| defense | full verdict | sequential verdict | same | full work | sequential work "
        "| ratio | full s | sequential s | instances run | stopped |"
    )
    print(header)
    print("|" + "---|" * 11)
    for row in rows:
        full, seq = row["full"], row["sequential"]
        facts = seq["sequential"] or {}
        print(
            f"| {row['defense']} | {full['verdict']} | {seq['verdict']} | "
            f"{'yes' if row['same_verdict'] else 'NO'} | {full['work']:,} | {seq['work']:,} | "
            f"{row['work_ratio']:.2f} | {full['seconds']:.0f} | {seq['seconds']:.0f} | "
            f"{facts.get('instances_run')}/{facts.get('instances_planned')} | "
            f"{stop_kind(facts.get('stopped', ''))}, round {facts.get('rounds_run')}/"
            f"{facts.get('rounds_planned')} |"
        )
    full_work = sum(row["full"]["work"] for row in rows)
    sequential_work = sum(row["sequential"]["work"] for row in rows)
    same = sum(row["same_verdict"] for row in rows)
    print(
        f"| all {len(rows)} | | | {same} of {len(rows)} | {full_work:,} | {sequential_work:,} | "
        f"{sequential_work / full_work:.2f} | {sum(r['full']['seconds'] for r in rows):.0f} | "
        f"{sum(r['sequential']['seconds'] for r in rows):.0f} | | |"
    )
    asr = ", ".join(
        f"{row['defense']} " + "/".join(percent(v) for v in row["full"]["asr"].values())
        for row in rows
    )
    print(f"headline ASR of the full audits ({args.attacks}): {asr}")
    print(json.dumps({"all_same": all(r["same_verdict"] for r in rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
