"""``bulwark pretrain``: pre-train a feature extractor with a defense, on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bulwark.commands.requests import (
    data_location_problem,
    dataset_argument,
    given,
    option_names,
    report_errors,
    set_values,
    split_argument,
)
from catalog import ARCHS, DATASETS, DEFAULT_DEFENSE, DEFENSES, RECIPES
from catalog.requests import PretrainRequest


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=(
            "Pre-train a feature extractor with one of the paper's defenses and write "
            "DIR/model.safetensors and DIR/manifest.json. Re-running with the same --out "
            "resumes an interrupted run from its last finished epoch."
        ),
    )
    parser.add_argument(
        "--dataset",
        required=True,
        type=dataset_argument,
        help=f"one of {', '.join(DATASETS)}, or the path of an image folder",
    )
    parser.add_argument("--data-dir", help="folder with the dataset's files")
    parser.add_argument("--arch", choices=ARCHS.names(), help="default: resnet18")
    parser.add_argument("--defense", choices=DEFENSES.names(), help=f"default: {DEFAULT_DEFENSE}")
    parser.add_argument(
        "--recipe",
        choices=RECIPES.names(),
        help="schedule preset (default: the paper's for the dataset; 'quick' for a CPU)",
    )
    parser.add_argument("--epochs", type=int, help="scale the recipe to N epochs")
    parser.add_argument("--seed", type=int, help="default: 0")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    group = parser.add_argument_group("overrides (default: the recipe's)")
    group.add_argument("--alpha", type=float, help="PC-Loss weight, in (0, 1)")
    group.add_argument("--epsilon", type=float, help="PGD budget in [0,1] pixel units")
    group.add_argument("--pgd-steps", type=int)
    group.add_argument("--pgd-step-size", type=float, help="default: 2.5 * epsilon / steps")
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
        type=split_argument,
        help="per-class PRETRAIN:RETRAIN:POOL counts (default: the dataset's)",
    )
    group.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other config field, e.g. --set momentum=0.8 --set milestones=[3,6]",
    )
    group.add_argument("--precision", choices=("auto", "float32", "bfloat16"))
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    group.add_argument(
        "--devices",
        type=int,
        help="train on N GPUs of this machine (N processes; on the CPU, N gloo processes), "
        "with the optimization of one (default: 1)",
    )
    parser.set_defaults(run=run, flags=option_names(parser))


def build_request(args: argparse.Namespace) -> tuple[PretrainRequest, str | None]:
    """The :class:`catalog.requests.PretrainRequest` the flags describe, and the data dir.

    Raises ``pydantic.ValidationError`` for an invalid request, ``ValueError`` for a bad --set.
    """
    dataset, folder = args.dataset
    overrides = given(
        alpha=args.alpha,
        epsilon=args.epsilon,
        pgd_steps=args.pgd_steps,
        pgd_step_size=args.pgd_step_size,
        feature_term=args.feature_term,
        lr=args.lr,
        batch_size=args.batch_size,
        warmup_epochs=args.warmup_epochs,
        split=args.split,
        precision=args.precision,
        devices=args.devices,
    ) | set_values(args.settings)
    request = PretrainRequest.model_validate(
        given(
            dataset=dataset,
            arch=args.arch,
            defense=args.defense,
            recipe=args.recipe,
            epochs=args.epochs,
            seed=args.seed,
            overrides=overrides,
        )
    )
    return request, args.data_dir or folder


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from common.specs import SpecError, resolve_pretrain
    from core.errors import BulwarkError
    from core.progress import Progress
    from core.train import pretrain

    try:
        request, data_dir = build_request(args)
        config = resolve_pretrain(request, data_dir=data_dir, device=args.device)
    except ValidationError as error:
        return report_errors("pretrain", [dict(e) for e in error.errors()], args.flags)
    except SpecError as error:
        return report_errors("pretrain", error.errors, args.flags)
    except ValueError as error:
        print(f"bulwark pretrain: {error}", file=sys.stderr)
        return 2
    problem = data_location_problem(config.dataset, config.data_dir)
    if problem is not None:  # before any work (a reference pre-training, a model load)
        print(f"bulwark pretrain: {problem}", file=sys.stderr)
        return 2

    print(
        f"pre-training {config.arch} on {config.dataset} with defense {config.defense}: "
        f"{config.epochs} epochs, lr milestones {list(config.milestones)}"
        + (
            f", PC-Loss from epoch {config.warmup_epochs + 1} (alpha {config.alpha})"
            if config.uses_pcl
            else ""
        )
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
    except BulwarkError as error:
        bar.close()
        print(f"bulwark pretrain: {error.user_message}", file=sys.stderr)
        return 2
    bar.close()
    print(f"Pre. Acc (clean test accuracy): {100 * result.pre_acc:.2f}%")
    print(f"hardened checkpoint: {result.model_dir / 'model.safetensors'}")
    print(f"manifest: {result.model_dir / 'manifest.json'}")
    return 0
