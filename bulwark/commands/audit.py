"""``bulwark audit``: run poisoning attacks against an extractor and write the ASR report.

Example (a quick audit of a checkpoint trained on Fashion-MNIST)::

    bulwark audit --model runs/fm-none --dataset fashion-mnist --pairs 0:7,2:1 \\
        --targets-per-pair 5 --iterations 200 --out runs/fm-none-audit.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bulwark.commands.requests import (
    dataset_argument,
    given,
    option_names,
    report_errors,
    set_values,
    split_argument,
)
from catalog import ATTACKS, DEFAULT_ATTACKS
from catalog.requests import PAPER_PAIRS, AuditRequest


def _pairs(text: str) -> list[tuple[int, int]]:
    """``0:7,2:1`` -> [(0, 7), (2, 1)]."""
    pairs = []
    for item in text.split(","):
        target, sep, poison = item.strip().partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected TARGET:POISON pairs, got {item!r}")
        try:
            pairs.append((int(target), int(poison)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"class indices must be integers: {item!r}") from None
    return pairs


def _attacks(text: str) -> list[str]:
    return [name.strip().lower() for name in text.split(",") if name.strip()]


def add_parser(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    paper_pairs = ",".join(f"{t}:{p}" for t, p in PAPER_PAIRS)
    parser.add_argument("--model", required=True, help="checkpoint folder or weights file")
    parser.add_argument(
        "--dataset", required=True, type=dataset_argument, help="dataset name or image-folder path"
    )
    parser.add_argument("--data-dir", help="folder holding the dataset's files")
    parser.add_argument(
        "--attacks",
        type=_attacks,
        help=f"comma-separated, of {','.join(ATTACKS)} (default: {','.join(DEFAULT_ATTACKS)})",
    )
    parser.add_argument(
        "--attack-set",
        dest="attack_settings",
        action="append",
        default=[],
        metavar="ATTACK.FIELD=VALUE",
        help="an attack's setting, e.g. --attack-set fc.mu=0.2 --attack-set bp.poisons=10",
    )
    parser.add_argument(
        "--pairs", type=_pairs, help=f"TARGET:POISON class pairs (default: {paper_pairs})"
    )
    parser.add_argument("--targets-per-pair", type=int, help="default: 10")
    parser.add_argument("--iterations", type=int, help="default: 500")
    parser.add_argument(
        "--delta", type=float, help="l_inf budget in [0,1] units (default: 25.5/255)"
    )
    parser.add_argument(
        "--retrain-epochs", type=int, help="default: 100; milestones keep the 60%%/80%% shape"
    )
    parser.add_argument(
        "--split", type=split_argument, help="per-class PRETRAIN:RETRAIN:POOL counts"
    )
    parser.add_argument(
        "--eval-images", type=int, help="test images for Pre./Re. Acc (default: all)"
    )
    parser.add_argument("--seed", type=int, help="default: 0")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other audit config field, e.g. --set retrain_lr=0.05",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--out", type=Path, required=True, help="where to write report.json")
    parser.add_argument(
        "--save-poisons",
        type=Path,
        metavar="DIR",
        help="also write <attack>.npz and <attack>.png poison grids here",
    )
    parser.set_defaults(run=run, flags=option_names(parser))
    return parser


def _attack_settings(pairs: list[str]) -> dict[str, dict[str, Any]]:
    settings: dict[str, dict[str, Any]] = {}
    for field, value in set_values(pairs, flag="--attack-set").items():
        attack, sep, name = field.partition(".")
        if not sep or not name:
            raise ValueError(f"--attack-set: expected ATTACK.FIELD=VALUE, got {field!r}")
        settings.setdefault(attack, {})[name] = value
    return settings


def build_request(args: argparse.Namespace) -> tuple[AuditRequest, str | None]:
    """The :class:`catalog.requests.AuditRequest` the flags describe, and the data dir.

    Raises ``pydantic.ValidationError`` for an invalid request, ``ValueError`` for a bad --set.
    """
    dataset, folder = args.dataset
    overrides = given(
        retrain_epochs=args.retrain_epochs,
        split=args.split,
        eval_images=args.eval_images,
        precision=args.precision,
    ) | set_values(args.settings)
    request = AuditRequest.model_validate(
        given(
            dataset=dataset,
            attacks=args.attacks,
            attack_settings=_attack_settings(args.attack_settings) or None,
            pairs=args.pairs,
            targets_per_pair=args.targets_per_pair,
            iterations=args.iterations,
            delta=args.delta,
            seed=args.seed,
            overrides=overrides,
        )
    )
    return request, args.data_dir or folder


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from common.specs import SpecError, resolve_audit

    try:
        request, data_dir = build_request(args)
        config = resolve_audit(
            request, model=str(args.model), data_dir=data_dir, device=args.device
        )
    except ValidationError as error:
        return report_errors("audit", [dict(e) for e in error.errors()], args.flags)
    except SpecError as error:
        return report_errors("audit", error.errors, args.flags)
    except ValueError as error:
        print(f"bulwark audit: {error}", file=sys.stderr)
        return 2

    from core.audit import run_audit
    from core.errors import BulwarkError
    from core.progress import Progress
    from core.report import render_asr_table

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
            if bar.total is not None and bar.n >= bar.total:
                bar.close()
        elif update.message:
            tqdm.write(f"[{100 * update.fraction:5.1f}%] {update.phase}: {update.message}")

    try:
        report = run_audit(config, progress=show, poisons_dir=args.save_poisons)
    except BulwarkError as error:
        print(f"bulwark audit: {error.user_message}", file=sys.stderr)
        return 2
    finally:
        for bar in bars.values():
            bar.close()
    report.write(args.out)
    print(render_asr_table(report))
    print(f"total {report.timings['total']:.1f}s")
    print(f"report written to {args.out}")
    return 0
