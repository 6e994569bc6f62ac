"""``bulwark audit``: run FC, CP and BP against an extractor and write the ASR report.

Example (a quick audit of a checkpoint trained on Fashion-MNIST)::

    bulwark audit --model runs/fm-none --dataset fashion-mnist --pairs 0:7,2:1 \\
        --targets-per-pair 5 --iterations 200 --out runs/fm-none-audit.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Bars are drawn per phase; the numbers they show are iterations (craft) or fractions.
_SUMMARY_HEADER = f"{'attack':<7}{'ASR':>14}{'95% CI':>16}{'baseline':>11}{'Re. Acc':>17}"


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    """``0:7,2:1`` -> ((0, 7), (2, 1))."""
    pairs = []
    for item in text.split(","):
        target, sep, poison = item.strip().partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected TARGET:POISON pairs, got {item!r}")
        try:
            pairs.append((int(target), int(poison)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"class indices must be integers: {item!r}") from None
    return tuple(pairs)


def _attacks(text: str) -> tuple[str, ...]:
    return tuple(name.strip().lower() for name in text.split(",") if name.strip())


def add_parser(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help=help_text, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or weights file")
    parser.add_argument("--dataset", required=True, help="dataset name or image-folder path")
    parser.add_argument("--data-dir", help="folder holding the dataset's files")
    parser.add_argument("--attacks", type=_attacks, default=("fc", "cp", "bp"),
                        help="comma-separated subset of fc,cp,bp (default: all)")  # fmt: skip
    parser.add_argument("--pairs", type=_pairs, default=None,
                        help="TARGET:POISON class pairs (default: 0:7,2:1,4:1,6:3)")  # fmt: skip
    parser.add_argument("--targets-per-pair", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--delta", type=float, default=None, help="l_inf budget in [0,1] units")
    parser.add_argument("--retrain-epochs", type=int, default=None)
    parser.add_argument("--split", default=None,
                        help="per-class split counts PRETRAIN:RETRAIN:POOL (default: the "
                             "dataset's)")  # fmt: skip
    parser.add_argument("--eval-images", type=int, default=None,
                        help="test images for Pre./Re. Acc (default: all)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default=None)
    parser.add_argument("--out", type=Path, required=True, help="where to write report.json")
    parser.add_argument(
        "--save-poisons", type=Path, default=None, metavar="DIR",
        help="also write <attack>.npz and <attack>.png poison grids here",
    )
    parser.set_defaults(run=run)
    return parser


def _config(args: argparse.Namespace) -> Any:
    from core.config import AuditConfig, SplitConfig

    values: dict[str, Any] = {
        "model": str(args.model),
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "attacks": args.attacks,
        "pairs": args.pairs,
        "targets_per_pair": args.targets_per_pair,
        "iterations": args.iterations,
        "delta": args.delta,
        "retrain_epochs": args.retrain_epochs,
        "eval_images": args.eval_images,
        "seed": args.seed,
        "device": args.device,
        "precision": args.precision,
    }
    if args.split:
        counts = [int(part) for part in args.split.split(":")]
        if len(counts) != 3:
            raise ValueError(f"--split wants PRETRAIN:RETRAIN:POOL, got {args.split!r}")
        values["split"] = SplitConfig(pretrain=counts[0], retrain=counts[1], pool=counts[2])
    if args.retrain_epochs is not None:
        # Keep the paper's schedule shape (x0.1 at 60% and 80%) for a shorter re-training.
        epochs = args.retrain_epochs
        values["retrain_milestones"] = tuple(
            sorted({m for m in (round(0.6 * epochs), round(0.8 * epochs)) if 1 <= m < epochs})
        )
    return AuditConfig.model_validate({k: v for k, v in values.items() if v is not None})


def _summary(report: dict[str, Any]) -> str:
    lines = []
    pre_acc = report.get("pre_acc")
    model = report["model"]
    lines.append(
        f"model {model['path']} ({model['arch']}, defense {model.get('defense') or '?'}), "
        f"Pre. Acc {'?' if pre_acc is None else f'{100 * pre_acc:.2f}%'}"
    )
    lines.append(_SUMMARY_HEADER)
    for name, result in report["attacks"].items():
        low, high = result["asr_wilson95"]
        asr = f"{100 * result['asr']:.1f}% ({result['successes']}/{result['instances']})"
        ci = f"[{100 * low:.1f}, {100 * high:.1f}]"
        re_acc = f"{100 * result['re_acc']['mean']:.2f}±{100 * result['re_acc']['std']:.2f}"
        baseline = f"{100 * result['baseline']['rate']:.1f}%"
        lines.append(f"{name:<7}{asr:>14}{ci:>16}{baseline:>11}{re_acc:>17}")
    if report.get("screen"):
        screen = report["screen"]
        lines.append(
            f"feature screen: separation {screen['separation']:.3f} (Eq. 4a, larger resists "
            f"better), normalized drift {screen['normalized_drift']:.3f} (Eq. 4b, smaller "
            "resists better)"
        )
    lines.append(f"total {report['timings']['total']:.1f}s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    try:
        config = _config(args)
    except (ValidationError, ValueError) as error:
        print(f"bulwark audit: invalid arguments:\n{error}", file=sys.stderr)
        return 2

    from core.audit import AuditError, run_audit, write_report
    from core.checkpoint import CheckpointError
    from core.data import DatasetError
    from core.progress import Progress

    bars: dict[str, tqdm] = {}

    def show(update: Progress) -> None:
        # One bar per attack's crafting (its iterations); other phases print a line.
        if update.phase.startswith("craft:") and update.steps:
            bar = bars.get(update.phase)
            if bar is None:
                bar = bars[update.phase] = tqdm(
                    total=update.steps, desc=update.phase, unit="it", leave=True
                )
            bar.n = update.step or 0
            if update.loss is not None:
                bar.set_postfix(objective=f"{update.loss:.4g}", refresh=False)
            bar.refresh()
            if bar.n >= bar.total:
                bar.close()
        elif update.message:
            tqdm.write(f"[{100 * update.fraction:5.1f}%] {update.phase}: {update.message}")

    try:
        report = run_audit(config, progress=show, poisons_dir=args.save_poisons)
    except (AuditError, CheckpointError, DatasetError) as error:
        print(f"bulwark audit: {error}", file=sys.stderr)
        return 2
    finally:
        for bar in bars.values():
            bar.close()
    write_report(report, args.out)
    print(_summary(report))
    print(f"report written to {args.out}")
    return 0
