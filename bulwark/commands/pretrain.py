"""``bulwark pretrain``: pre-train a feature extractor with a defense, on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.config import ARCHS, DATASETS, DEFENSES, RECIPES, SplitConfig, pretrain_config


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=(
            "Pre-train a feature extractor with one of the paper's defenses and write "
            "DIR/model.safetensors and DIR/manifest.json. Re-running with the same --out "
            "resumes an interrupted run from its last finished epoch."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset", required=True, help=f"one of {', '.join(DATASETS)}, or an image-folder path"
    )
    parser.add_argument("--data-dir", help="folder with the dataset's files")
    parser.add_argument("--arch", choices=ARCHS, default="resnet18")
    parser.add_argument("--defense", choices=DEFENSES, default="none")
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="schedule preset (default: the paper's for the dataset; 'quick' for a CPU)",
    )
    parser.add_argument("--epochs", type=int, help="scale the recipe to N epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    group = parser.add_argument_group("overrides (default: the recipe's)")
    group.add_argument("--alpha", type=float, help="PC-Loss weight, in (0, 1)")
    group.add_argument("--epsilon", type=float, help="PGD budget in [0,1] pixel units")
    group.add_argument("--pgd-steps", type=int)
    group.add_argument("--pgd-step-size", type=float, help="default 2.5 * epsilon / steps")
    group.add_argument(
        "--no-feature-term",
        dest="feature_term",
        action="store_false",
        default=None,
        help="train AT without ||f(x_adv) - f(x)|| (plain Madry AT)",
    )
    group.add_argument("--lr", type=float)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--warmup-epochs", type=int, help="base-loss epochs before PC-Loss")
    group.add_argument(
        "--split",
        help="per-class PRETRAIN:RETRAIN:POOL counts (default 4800:50:150, digits 100:10:25)",
    )
    group.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other PretrainConfig field, e.g. --set momentum=0.8 --set milestones=[3,6]",
    )
    group.add_argument("--precision", choices=("auto", "float32", "bfloat16"))
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.set_defaults(run=run)


def _split(text: str | None) -> SplitConfig | None:
    if text is None:
        return None
    try:
        pretrain, retrain, pool = (int(part) for part in text.split(":"))
    except ValueError:
        raise SystemExit(
            f"--split: expected PRETRAIN:RETRAIN:POOL integers, got {text!r}"
        ) from None
    return SplitConfig(pretrain=pretrain, retrain=retrain, pool=pool)


def _settings(pairs: list[str]) -> dict[str, object]:
    """``FIELD=VALUE`` pairs; a VALUE that parses as JSON is taken as such, else as a string."""
    settings: dict[str, object] = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep or not field:
            raise SystemExit(f"--set: expected FIELD=VALUE, got {pair!r}")
        try:
            settings[field.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            settings[field.replace("-", "_")] = value
    return settings


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from core.data import DatasetError
    from core.progress import Progress
    from core.train import TrainingError, pretrain

    try:
        config = pretrain_config(
            dataset=args.dataset,
            defense=args.defense,
            recipe=args.recipe,
            epochs=args.epochs,
            arch=args.arch,
            seed=args.seed,
            data_dir=args.data_dir,
            alpha=args.alpha,
            epsilon=args.epsilon,
            pgd_steps=args.pgd_steps,
            pgd_step_size=args.pgd_step_size,
            feature_term=args.feature_term,
            lr=args.lr,
            batch_size=args.batch_size,
            warmup_epochs=args.warmup_epochs,
            split=_split(args.split),
            precision=args.precision,
            device=args.device,
            **_settings(args.settings),
        )
    except ValidationError as error:
        print(f"bulwark pretrain: invalid settings:\n{error}", file=sys.stderr)
        return 2

    print(
        f"pre-training {config.arch} on {config.dataset} with defense {config.defense}: "
        f"{config.epochs} epochs, lr milestones {list(config.milestones)}"
        + (f", PC-Loss from epoch {config.warmup_epochs + 1} (alpha {config.alpha})"
           if config.uses_pcl else "")
        + (f", PGD-{config.pgd_steps} eps {config.epsilon:.4f}" if config.uses_at else ""),
        flush=True,
    )
    bar = tqdm(total=config.epochs, unit="epoch", dynamic_ncols=True)

    def show(report: Progress) -> None:
        if report.phase != "training" or report.epoch is None:
            bar.set_description(report.phase)
            return
        if report.step is not None:
            bar.n = report.epoch - 1 + report.step / max(1, report.steps or 1)
            bar.set_description(f"epoch {report.epoch}/{report.epochs}")
            bar.refresh()
        else:
            bar.n = report.epoch
            bar.set_postfix(loss=f"{report.loss:.4f}", acc=f"{report.accuracy:.3f}")

    try:
        result = pretrain(config, out_dir=args.out, progress=show)
    except (DatasetError, TrainingError) as error:
        bar.close()
        print(f"bulwark pretrain: {error}", file=sys.stderr)
        return 2
    bar.close()
    print(f"Pre. Acc (clean test accuracy): {100 * result.pre_acc:.2f}%")
    print(f"hardened checkpoint: {result.model_dir / 'model.safetensors'}")
    print(f"manifest: {result.model_dir / 'manifest.json'}")
    return 0
