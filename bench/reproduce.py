"""Reproduce the paper's Table 1 (and its ablations) on Fashion-MNIST, resumably.

What it does: pre-trains one extractor per variant (Table 1: the defenses none, pcl, at,
at-pcl) with a CPU preset, audits each with FC, CP and BP under the paper's protocol (the
paper's four pairs by class index, ``--targets-per-pair`` targets each, delta 25.5/255, 500
iterations; ``--pairs`` for others), and writes, in ``--out``:

- ``models/<variant>/``: hardened checkpoints (``pretrain`` resumes an interrupted one),
- ``reports/<variant>.json``: the audit reports,
- ``table.md``: a table in the format of the paper's Table 1 (Pre. Acc, ASR with its 95%
  Wilson interval, Re. Acc mean +- std) plus the feature-space screen of every model,
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

from core.audit import run_audit
from core.config import AuditConfig, SplitConfig, pretrain_config
from core.data import load_dataset
from core.train import pretrain

ATTACKS = ("fc", "cp", "bp")


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
        return [Variant(f"{d}-alpha{a}", d, {"alpha": a})
                for d in ("pcl", "at-pcl") for a in (0.3, 0.4, 0.5, 0.6, 0.8)]  # fmt: skip
    if ablation == "feature-term":
        return [Variant("at-ce-eps8", "at", {"epsilon": 8 / 255, "feature_term": False}),
                Variant("at-eps8", "at", {"epsilon": 8 / 255})]  # fmt: skip
    raise SystemExit(f"--ablation must be table1, epsilon, alpha or feature-term; got {ablation}")


def atomic_json(path: Path, value: Any) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


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
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument(
        "--pairs", default="0:7,2:1,4:1,6:3",
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
    run.update({
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    })  # fmt: skip
    split = SplitConfig(pretrain=args.pretrain_per_class, retrain=50, pool=150)
    data = load_dataset("fashion-mnist", args.data_dir)
    chosen = variants(args.ablation)
    if args.variants:
        wanted = set(args.variants.split(","))
        chosen = [v for v in chosen if v.name in wanted]

    for variant in chosen:
        model_dir = out / "models" / variant.name
        if not (model_dir / "manifest.json").is_file():
            config = pretrain_config(
                dataset="fashion-mnist", defense=variant.defense, recipe="paper",
                epochs=args.epochs, arch=args.arch, seed=args.seed, split=split,
                pgd_steps=args.pgd_steps, data_dir=args.data_dir, device=args.device,
                **variant.overrides,
            )  # fmt: skip
            log(f"pre-training {variant.name}: {config.epochs} epochs, milestones "
                f"{list(config.milestones)}, warm-up {config.warmup_epochs}")  # fmt: skip
            result = pretrain(config, out_dir=model_dir, dataset=data,
                              progress=epoch_logger(variant.name))  # fmt: skip
            run["phases"][f"pretrain:{variant.name}"] = result.seconds
            atomic_json(run_path, run)
            log(f"{variant.name}: Pre. Acc {100 * result.pre_acc:.2f}% ({result.seconds:.0f} s)")

        report_path = out / "reports" / f"{variant.name}.json"
        if not report_path.is_file():
            audit = AuditConfig(
                model=str(model_dir), dataset="fashion-mnist", data_dir=args.data_dir,
                split=split, attacks=tuple(args.attacks.split(",")),
                pairs=tuple(tuple(int(c) for c in p.split(":")) for p in args.pairs.split(",")),
                targets_per_pair=args.targets_per_pair, iterations=args.iterations,
                seed=args.seed, device=args.device,
            )  # fmt: skip
            log(f"auditing {variant.name}: {audit.attacks}, "
                f"{len(audit.pairs) * audit.targets_per_pair} "
                f"instances, {audit.iterations} iterations")  # fmt: skip
            started = time.perf_counter()
            report = run_audit(audit, dataset=data)
            atomic_json(report_path, report)
            run["phases"][f"audit:{variant.name}"] = time.perf_counter() - started
            atomic_json(run_path, run)
            log(f"{variant.name}: " + ", ".join(
                f"{a.upper()} ASR {100 * r['asr']:.1f}%" for a, r in report["attacks"].items()))

    reports = {v.name: json.loads((out / "reports" / f"{v.name}.json").read_text())
               for v in chosen if (out / "reports" / f"{v.name}.json").is_file()}  # fmt: skip
    (out / "table.md").write_text(render_table(reports, run))
    bar_chart(reports, out / "asr.png")
    log(f"wrote {out / 'table.md'} and {out / 'asr.png'}")
    return 0


def epoch_logger(name: str):
    def report(progress) -> None:
        if progress.phase == "training" and progress.step is None:
            log(f"{name}: epoch {progress.epoch}/{progress.epochs} loss {progress.loss:.4f} "
                f"train acc {100 * progress.accuracy:.1f}%")  # fmt: skip

    return report


def render_table(reports: dict[str, dict], run: dict) -> str:
    attacks = [a for a in ATTACKS if any(a in r["attacks"] for r in reports.values())]
    head = "| Defense | Pre. Acc | " + " | ".join(
        f"{a.upper()} ASR (95% CI) | {a.upper()} Re. Acc" for a in attacks) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(attacks))]
    for name, report in reports.items():
        cells = [name, f"{100 * report['pre_acc']:.2f}"]
        for attack in attacks:
            r = report["attacks"].get(attack)
            if r is None:
                cells += ["", ""]
                continue
            low, high = r["asr_wilson95"]
            cells.append(f"{100 * r['asr']:.1f} ({100 * low:.0f}-{100 * high:.0f})"
                         f" [{r['successes']}/{r['instances']}]")  # fmt: skip
            cells.append(f"{100 * r['re_acc']['mean']:.2f}±{100 * r['re_acc']['std']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Baseline (unperturbed bases in place of the poisons), per attack:", ""]
    for name, report in reports.items():
        rates = ", ".join(f"{a.upper()} {100 * r['baseline']['rate']:.1f}%"
                          for a, r in report["attacks"].items())  # fmt: skip
        lines.append(f"- {name}: {rates}")
    lines += ["", "Feature-space screen (Eq. 4a separation: larger is more robust; Eq. 4b "
              "normalized drift at delta: smaller is more robust):", "",
              "| Defense | separation | normalized drift |", "|---|---|---|"]  # fmt: skip
    for name, report in reports.items():
        if report.get("screen"):
            s = report["screen"]
            lines.append(f"| {name} | {s['separation']:.3f} | {s['normalized_drift']:.3f} |")
    lines += ["", "Wall time per phase (s):", ""]
    lines += [f"- {phase}: {seconds:.0f}" for phase, seconds in run["phases"].items()]
    lines += ["", f"Machine: {run['machine']}", f"Command: `{run['command']}`", ""]
    return "\n".join(lines)


def bar_chart(reports: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports)
    attacks = [a for a in ATTACKS if any(a in r["attacks"] for r in reports.values())]
    width = 0.8 / max(1, len(attacks))
    figure, axes = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    for i, attack in enumerate(attacks):
        values = [100 * reports[n]["attacks"].get(attack, {"asr": 0})["asr"] for n in names]
        errors = [[100 * (reports[n]["attacks"][attack]["asr"] - reports[n]["attacks"][attack]
                   ["asr_wilson95"][0]) for n in names],
                  [100 * (reports[n]["attacks"][attack]["asr_wilson95"][1] - reports[n]
                   ["attacks"][attack]["asr"]) for n in names]]  # fmt: skip
        positions = [j + (i - (len(attacks) - 1) / 2) * width for j in range(len(names))]
        axes.bar(positions, values, width, yerr=errors, capsize=3, label=attack.upper())
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
