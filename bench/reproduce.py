"""Reproduce the paper's Table 1 (and its ablations) on Fashion-MNIST, resumably.

What it does: pre-trains one extractor per variant (Table 1: the defenses none, pcl, at,
at-pcl) with a CPU preset, audits each with the catalog's default attacks FC, CP and BP
(``--attacks`` for others) under the paper's protocol (the paper's four pairs by class index,
``--targets-per-pair`` targets each, delta 25.5/255, 500 iterations; ``--pairs`` for others),
and writes, in ``--out``:

- ``models/<variant>/``: hardened checkpoints (``pretrain`` resumes an interrupted one),
- ``reports/<variant>.json``: the audit reports (``core.report.AuditReport``; reports saved
  by an earlier version, schema ``bulwark-audit/1``, are read as they are),
- ``table.md``: a table in the format of the paper's Table 1 (Pre. Acc, ASR with its 95%
  Wilson interval, Re. Acc mean +- std), its cells rendered by ``core.report``'s cell
  formatters, plus the feature-space screen of every model,
- ``asr.png``: a bar chart of ASR per variant and attack,
- ``run.json``: the machine, the command, and wall time per phase.

Every phase whose output exists is skipped, so the script can run in the background and be
started again after an interruption: ``nohup python bench/reproduce.py --out runs/table1 &``.

CPU preset (default): ConvNet, the paper's split rules on Fashion-MNIST with
``--pretrain-per-class`` (default 1000) pre-training images per class, 50 re-training and
150 base-pool images per class; ``--epochs`` (default 6) scaled from the paper's recipes
(PCL: the first 45% of epochs with the base loss); AT: PGD-``--pgd-steps`` (default 5) at
epsilon 4/255. Ablations (``--ablation``): ``epsilon`` (AT at 4, 6, 8/255), ``alpha``
(pcl and at-pcl at 0.3, 0.4, 0.5, 0.6, 0.8), ``feature-term`` (AT at 8/255 with and without
||f(x_adv) - f(x)||).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from catalog import ATTACKS, DEFAULT_ATTACKS, SplitConfig
from core.audit import run_audit
from core.config import audit_config, pretrain_config
from core.datasets import load_dataset
from core.report import (
    AuditReport,
    asr_cell,
    interval_cell,
    percent,
    re_acc_cell,
    read_report,
)
from core.train import pretrain


@dataclass(frozen=True)
class Variant:
    name: str
    defense: str
    overrides: dict[str, Any] = field(default_factory=dict)


def variants(ablation: str) -> list[Variant]:
    if ablation == "table1":
        return [Variant(d, d) for d in ("none", "pcl", "at", "at-pcl")]
    if ablation == "epsilon":
        return [Variant(f"at-eps{e}", "at", {"epsilon": e / 255}) for e in (4, 6, 8)]
    if ablation == "alpha":
        return [
            Variant(f"{d}-alpha{a}", d, {"alpha": a})
            for d in ("pcl", "at-pcl")
            for a in (0.3, 0.4, 0.5, 0.6, 0.8)
        ]
    if ablation == "feature-term":
        return [
            Variant("at-ce-eps8", "at", {"epsilon": 8 / 255, "feature_term": False}),
            Variant("at-eps8", "at", {"epsilon": 8 / 255}),
        ]
    raise SystemExit(f"--ablation must be table1, epsilon, alpha or feature-term; got {ablation}")


def atomic_json(path: Path, value: Any) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def ensure_model(
    variant: Variant,
    model_dir: Path,
    data: Any,
    args: argparse.Namespace,
    split: SplitConfig,
) -> float | None:
    """Pre-train ``variant`` into ``model_dir`` with the CPU preset (``args``: epochs, arch,
    seed, pgd_steps, data_dir, device) unless it is there; the seconds it took, or None."""
    if (model_dir / "manifest.json").is_file():
        return None
    config = pretrain_config(
        dataset="fashion-mnist",
        defense=variant.defense,
        recipe="paper",
        epochs=args.epochs,
        arch=args.arch,
        seed=args.seed,
        split=split,
        pgd_steps=args.pgd_steps,
        data_dir=args.data_dir,
        device=args.device,
        **variant.overrides,
    )
    log(
        f"pre-training {variant.name}: {config.epochs} epochs, milestones "
        f"{list(config.milestones)}, warm-up {config.warmup_epochs}"
    )
    result = pretrain(config, out_dir=model_dir, dataset=data, progress=epoch_logger(variant.name))
    log(f"{variant.name}: Pre. Acc {100 * result.pre_acc:.2f}% ({result.seconds:.0f} s)")
    return result.seconds


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ablation", default="table1")
    parser.add_argument("--arch", default="convnet")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pgd-steps", type=int, default=5)
    parser.add_argument("--pretrain-per-class", type=int, default=1000)
    parser.add_argument("--targets-per-pair", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS))
    parser.add_argument(
        "--pairs",
        default="0:7,2:1,4:1,6:3",
        help="target:poison class pairs (default: the paper's, by index)",
    )
    parser.add_argument("--variants", help="only these variants (comma-separated names)")
    parser.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian's)")
    parser.add_argument("--device")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out: Path = args.out
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(exist_ok=True)
    run_path = out / "run.json"
    run = json.loads(run_path.read_text()) if run_path.is_file() else {"phases": {}}
    run.update(
        {
            "command": " ".join([sys.executable, *sys.argv]),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            },
        }
    )
    split = SplitConfig(pretrain=args.pretrain_per_class, retrain=50, pool=150)
    data = load_dataset("fashion-mnist", args.data_dir)
    chosen = variants(args.ablation)
    if args.variants:
        wanted = set(args.variants.split(","))
        chosen = [v for v in chosen if v.name in wanted]

    for variant in chosen:
        model_dir = out / "models" / variant.name
        seconds = ensure_model(variant, model_dir, data, args, split)
        if seconds is not None:
            run["phases"][f"pretrain:{variant.name}"] = seconds
            atomic_json(run_path, run)

        report_path = out / "reports" / f"{variant.name}.json"
        if not report_path.is_file():
            audit = audit_config(
                model=str(model_dir),
                dataset="fashion-mnist",
                data_dir=args.data_dir,
                split=split,
                attacks=tuple(args.attacks.split(",")),
                pairs=tuple(tuple(int(c) for c in p.split(":")) for p in args.pairs.split(",")),
                targets_per_pair=args.targets_per_pair,
                iterations=args.iterations,
                seed=args.seed,
                device=args.device,
            )
            log(
                f"auditing {variant.name}: {audit.attacks}, "
                f"{len(audit.pairs) * audit.targets_per_pair} "
                f"instances, {audit.iterations} iterations"
            )
            started = time.perf_counter()
            report = run_audit(audit, dataset=data)
            report.write(report_path)
            run["phases"][f"audit:{variant.name}"] = time.perf_counter() - started
            atomic_json(run_path, run)
            asrs = (f"{a.upper()} ASR {percent(r.asr)}" for a, r in report.attacks.items())
            log(f"{variant.name}: " + ", ".join(asrs))

    paths = {v.name: out / "reports" / f"{v.name}.json" for v in chosen}
    reports = {name: read_report(path) for name, path in paths.items() if path.is_file()}
    (out / "table.md").write_text(render_table(reports, run))
    bar_chart(reports, out / "asr.png")
    log(f"wrote {out / 'table.md'} and {out / 'asr.png'}")
    return 0


def epoch_logger(name: str):
    def report(progress) -> None:
        if progress.phase == "training" and progress.step is None:
            log(
                f"{name}: epoch {progress.epoch}/{progress.epochs} loss {progress.loss:.4f} "
                f"train acc {100 * progress.accuracy:.1f}%"
            )

    return report


def render_table(reports: dict[str, AuditReport], run: dict) -> str:
    attacks = present_attacks(reports)
    head = "| Defense | Pre. Acc | " + " | ".join(
        f"{a.upper()} ASR (95% CI) | {a.upper()} Re. Acc" for a in attacks
    )
    lines = [head + " |", "|" + "---|" * (2 + 2 * len(attacks))]
    for name, report in reports.items():
        pre_acc = "?" if report.pre_acc is None else percent(report.pre_acc, 2)
        cells = [name, pre_acc]
        for attack in attacks:
            result = report.attacks.get(attack)
            if result is None:
                cells += ["", ""]
                continue
            cells.append(f"{asr_cell(result)} {interval_cell(result.asr_wilson95)}")
            cells.append(re_acc_cell(result.re_acc))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Baseline (unperturbed bases in place of the poisons), per attack:", ""]
    for name, report in reports.items():
        rates = ", ".join(
            f"{a.upper()} {percent(r.baseline.rate)}" for a, r in report.attacks.items()
        )
        lines.append(f"- {name}: {rates}")
    lines += [
        "",
        "Feature-space screen (Eq. 4a separation: larger is more robust; Eq. 4b "
        "normalized drift at delta: smaller is more robust):",
        "",
        "| Defense | separation | normalized drift |",
        "|---|---|---|",
    ]
    for name, report in reports.items():
        if report.screen is not None:
            s = report.screen
            lines.append(f"| {name} | {s.separation:.3f} | {s.normalized_drift:.3f} |")
    lines += ["", "Wall time per phase (s):", ""]
    lines += [f"- {phase}: {seconds:.0f}" for phase, seconds in run["phases"].items()]
    lines += ["", f"Machine: {run['machine']}", f"Command: `{run['command']}`", ""]
    return "\n".join(lines)


def present_attacks(reports: dict[str, AuditReport]) -> list[str]:
    """The catalog's attacks that some report ran, in catalog order."""
    return [a for a in ATTACKS if any(a in r.attacks for r in reports.values())]


def bar_chart(reports: dict[str, AuditReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports)
    attacks = present_attacks(reports)
    width = 0.8 / max(1, len(attacks))
    figure, axes = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    for i, attack in enumerate(attacks):
        values, below, above = [], [], []
        for name in names:
            result = reports[name].attacks.get(attack)
            asr, (low, high) = (result.asr, result.asr_wilson95) if result else (0.0, (0.0, 0.0))
            values.append(100 * asr)
            below.append(100 * (asr - low))
            above.append(100 * (high - asr))
        positions = [j + (i - (len(attacks) - 1) / 2) * width for j in range(len(names))]
        axes.bar(positions, values, width, yerr=[below, above], capsize=3, label=attack.upper())
    axes.set_xticks(range(len(names)), names)
    axes.set_ylabel("ASR (%)")
    axes.set_ylim(0, 105)
    axes.legend()
    axes.set_title("Attack success rate per defense (95% Wilson intervals)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
