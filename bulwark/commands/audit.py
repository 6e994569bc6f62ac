"""``bulwark audit``: run poisoning attacks against an extractor and write the ASR report.

Example (a quick audit of a checkpoint trained on Fashion-MNIST)::

    bulwark audit --model runs/fm-none --dataset fashion-mnist --pairs 0:7,2:1 \\
        --targets-per-pair 5 --iterations 200 --out runs/fm-none-audit.json

A ``torch.export`` program (``--model extractor.pt2``) of any architecture is checked and
loaded without unpickling anything (``core.exported``); ``--input-shape`` defaults to the
dataset's image shape, ``--output logits`` splits off the program's final linear layer.

Every audit ends with a verdict (``catalog.policy``, docs/policy.md): under ``--policy
policy.json``, else under Bulwark's default policy. The verdict line and its checks are
printed and the report gets a ``verdict`` key; with ``--policy`` the exit code says it.

The report reads the model against an undefended reference audited on the same instances
(``--reference``: ``auto`` pre-trains the model's architecture without a defense once and
caches it; a checkpoint folder; or ``none``), over explicit ``--pairs`` and the pairs of
``--pair-sets`` (default: the two the clean model confuses most and two random ones), with an
optional budget curve (``--budget-deltas``, ``--budget-poisons``). ``--json`` prints the
report's JSON to stdout instead of the tables.

Exit codes: 0 the audit ran (and, with --policy, passed); 1 the policy failed; 3 the policy's
verdict is inconclusive (too few instances to decide); 2 usage errors (bad flags, a missing,
non-JSON or invalid policy file, an audit the model or data cannot run), reported before any
audit work starts where they can be.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bulwark.commands.requests import (
    data_location_problem,
    dataset_argument,
    given,
    option_names,
    report_errors,
    set_values,
    split_argument,
)
from catalog import ATTACKS, DATASETS, DEFAULT_ATTACKS
from catalog.requests import DEFAULT_PAIR_SETS, PAIR_SETS, PAPER_PAIRS, AuditRequest

if TYPE_CHECKING:
    from catalog.policy import Policy
    from core.config import AuditConfig
    from core.progress import ProgressCallback
    from core.report import AuditReport


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


def _pair_sets(text: str) -> list[str]:
    return [name.strip().lower() for name in text.split(",") if name.strip()]


def _deltas(text: str) -> list[float]:
    """``4/255,0.1`` -> [0.0157, 0.1]."""
    values = []
    for item in text.split(","):
        numerator, slash, denominator = item.strip().partition("/")
        try:
            value = float(numerator) / (float(denominator) if slash else 1.0)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"expected numbers or N/255, got {item!r}") from None
        values.append(value)
    return values


def _counts(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None


def _input_shape(text: str) -> tuple[int, int, int]:
    """``3,32,32`` -> (3, 32, 32)."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W integers, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes C,H,W, got {text!r}")
    return shape[0], shape[1], shape[2]


def add_parser(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    paper_pairs = ",".join(f"{t}:{p}" for t, p in PAPER_PAIRS)
    parser.add_argument(
        "--model", required=True, help="checkpoint folder, weights file or torch.export .pt2"
    )
    parser.add_argument(
        "--input-shape",
        type=_input_shape,
        metavar="C,H,W",
        help="a .pt2 model's image shape (default: the dataset's, else the program's own)",
    )
    parser.add_argument(
        "--output",
        choices=("features", "logits"),
        default="features",
        help="what a .pt2 model returns: f(x), or logits from a final linear layer",
    )
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
        "--pairs",
        type=_pairs,
        help=f"explicit TARGET:POISON class pairs, e.g. {paper_pairs} (the paper's)",
    )
    parser.add_argument(
        "--pair-sets",
        type=_pair_sets,
        metavar="SET,...",
        help=f"more pairs from {','.join(PAIR_SETS)} (default: {','.join(DEFAULT_PAIR_SETS)} "
        "without --pairs, none with them)",
    )
    parser.add_argument("--closest-pairs", type=int, help="pairs the closest set adds (2)")
    parser.add_argument("--random-pairs", type=int, help="pairs the random set adds (2)")
    parser.add_argument(
        "--reference",
        default="auto",
        metavar="auto|none|PATH",
        help="the undefended reference audited on the same instances: a checkpoint folder, "
        "auto (pre-train the model's architecture without a defense, cached in "
        "--reference-cache) or none (default: auto)",
    )
    parser.add_argument(
        "--reference-cache",
        type=Path,
        metavar="DIR",
        help="where auto references are kept (default: $BULWARK_CACHE_DIR/references, else "
        "~/.cache/bulwark/references)",
    )
    parser.add_argument(
        "--budget-deltas",
        type=_deltas,
        metavar="D,...",
        help="budget curve: deltas in [0,1] or as N/255, e.g. 4/255,8/255,16/255,25.5/255",
    )
    parser.add_argument(
        "--budget-poisons", type=_counts, metavar="K,...", help="budget curve: poisons, e.g. 1,5,10"
    )
    parser.add_argument(
        "--budget-attack", help="the attack the curve sweeps (default: bp if run, else the first)"
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
        "--policy",
        type=Path,
        metavar="FILE",
        help="a JSON policy (thresholds, confidence): exit 0 pass, 1 fail, 3 inconclusive",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report's JSON to stdout instead of the tables (progress on stderr)",
    )
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
            pair_sets=args.pair_sets,
            closest_pairs=args.closest_pairs,
            random_pairs=args.random_pairs,
            budget=_budget(args),
            targets_per_pair=args.targets_per_pair,
            iterations=args.iterations,
            delta=args.delta,
            seed=args.seed,
            overrides=overrides,
        )
    )
    return request, args.data_dir or folder


def _budget(args: argparse.Namespace) -> dict[str, Any] | None:
    if not (args.budget_deltas or args.budget_poisons or args.budget_attack):
        return None
    return given(attack=args.budget_attack, deltas=args.budget_deltas, poisons=args.budget_poisons)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from common.specs import SpecError, resolve_audit

    policy = None
    if args.policy is not None:
        policy = _read_policy(args.policy)
        if policy is None:
            return 2
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
    problem = data_location_problem(config.dataset, config.data_dir)
    if problem is not None:  # before any work (a reference pre-training, a model load)
        print(f"bulwark audit: {problem}", file=sys.stderr)
        return 2

    from catalog.policy import DEFAULT_POLICY
    from core.audit import run_audit
    from core.errors import BulwarkError
    from core.progress import Progress
    from core.report import render_asr_table
    from core.verdict import decide, render_verdict

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
            tqdm.write(
                f"[{100 * update.fraction:5.1f}%] {update.phase}: {update.message}",
                file=sys.stderr,
            )

    try:
        with contextlib.ExitStack() as folders:
            model = folders.enter_context(_model_folder(args))
            config = config.model_copy(update={"model": model})
            reference, source, note = _reference(args, config, show)
            if reference is not None:
                reference = folders.enter_context(_model_folder(args, reference))
            report = run_audit(
                config.model_copy(update={"reference": reference}),
                progress=show,
                poisons_dir=args.save_poisons,
                reference_source=source,
            )
        if note is not None:
            report = report.model_copy(update={"reference_note": note})
        report = _named_model(report, str(args.model))
    except BulwarkError as error:
        print(f"bulwark audit: {error.user_message}", file=sys.stderr)
        return 2
    finally:
        for bar in bars.values():
            bar.close()
    # Every audit ends with a verdict: under --policy, else under Bulwark's default policy
    # (catalog.policy.DEFAULT_POLICY); only a --policy verdict sets the exit code.
    verdict = decide(report, policy or DEFAULT_POLICY)
    report = report.model_copy(update={"verdict": verdict})
    report.write(args.out)
    if args.json:
        # stdout carries the JSON alone; the human lines go to stderr.
        print(report.model_dump_json(indent=2))
        print(render_verdict(verdict).splitlines()[0], file=sys.stderr)
        print(f"report written to {args.out}", file=sys.stderr)
    else:
        print(render_asr_table(report))
        print(render_verdict(verdict))
        print(f"total {report.timings['total']:.1f}s")
        print(f"report written to {args.out}")
    return EXIT_CODES[verdict.outcome] if policy is not None else 0


EXIT_CODES = {"pass": 0, "fail": 1, "inconclusive": 3}


def _reference(
    args: argparse.Namespace, config: AuditConfig, progress: ProgressCallback
) -> tuple[str | None, Literal["named", "auto"], str | None]:
    """(reference folder or None, how it was chosen, why there is none).

    ``auto`` pre-trains the model's undefended twin once into the cache (``core.reference``)
    and reuses it; an audit whose model has no automatic reference runs without one and says
    why in the report.
    """
    if args.reference == "none":
        return None, "named", "no reference: --reference none"
    if args.reference != "auto":
        return str(args.reference), "named", None
    from core.checkpoint import load_extractor
    from core.reference import (
        NoAutoReferenceError,
        auto_reference_config,
        ensure_reference,
        reference_key,
    )

    loaded = load_extractor(config.model)
    manifest = {**loaded.manifest, "arch": loaded.model.arch}
    try:
        pretrain = auto_reference_config(manifest, config)
    except NoAutoReferenceError as error:
        return None, "auto", error.user_message
    data_identity = str(args.dataset[1] or config.data_dir or config.dataset)
    folder = _reference_cache(args) / reference_key(pretrain, data_identity)
    print(f"bulwark audit: auto reference {folder}", file=sys.stderr)
    ensure_reference(pretrain, folder, progress=progress)
    return str(folder), "auto", None


def _reference_cache(args: argparse.Namespace) -> Path:
    if args.reference_cache is not None:
        return Path(args.reference_cache)
    root = os.environ.get("BULWARK_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "bulwark") / "references"


def _read_policy(path: Path) -> Policy | None:
    """The policy in ``path``, or None after one line per problem on stderr."""
    from pydantic import ValidationError

    from catalog.policy import read_policy

    try:
        return read_policy(path)
    except OSError as error:
        print(f"bulwark audit: --policy: cannot read {path}: {error.strerror}", file=sys.stderr)
    except ValidationError as error:
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"] if part != "[key]")
            message = str(problem["msg"]).removeprefix("Value error, ")
            field = f" {where}:" if where else ""
            print(f"bulwark audit: --policy {path}:{field} {message}", file=sys.stderr)
    return None


@contextmanager
def _model_folder(args: argparse.Namespace, path: str | Path | None = None) -> Iterator[str]:
    """The checkpoint the audit reads: ``path`` (default ``--model``) itself, or for a
    ``.pt2`` program a temporary folder holding it (checked, untouched) and its manifest,
    with ``--input-shape`` and ``--output`` (which apply to every .pt2 of the audit)."""
    path = Path(args.model if path is None else path)
    if path.suffix != ".pt2":
        if path == Path(args.model) and (args.input_shape is not None or args.output != "features"):
            from core.errors import BulwarkError

            raise BulwarkError("--input-shape and --output apply to a .pt2 model only")
        yield str(path)
        return
    from core.exported import save_exported

    name, _ = args.dataset
    spec = DATASETS.get(name) if name in DATASETS else None
    shape = args.input_shape
    if shape is None and spec is not None and spec.channels and spec.size:
        shape = (spec.channels, *spec.size)
    with tempfile.TemporaryDirectory(prefix="bulwark-pt2-") as scratch:
        folder = Path(scratch) / "model"
        save_exported(
            path,
            folder,
            input_shape=shape,
            output=args.output,
            manifest={"source_file": str(path)},
        )
        yield str(folder)


def _named_model(report: AuditReport, path: str) -> AuditReport:
    """The report with ``path`` as the audited model (not the temporary folder it was read
    from)."""
    if report.model.path == path:
        return report
    return report.model_copy(
        update={
            "model": report.model.model_copy(update={"path": path}),
            "config": {**report.config, "model": path},
        }
    )
