"""``bulwark remote``: talk to a Bulwark service over HTTP (``bulwark.client``), torch-free.

The hub flow::

    export BULWARK_URL=https://bulwark.example.com BULWARK_API_KEY=bwk_...
    bulwark remote upload model extractor.pt2 --input-shape 3,32,32 --output features
    bulwark remote upload dataset hub.npz --name hub
    bulwark remote submit audit --model-id MODEL --dataset-id DATASET --wait
    bulwark remote get report JOB --out report.json
    bulwark remote get card MODEL

Connection: ``--url`` (default: $BULWARK_URL, else the config file's ``url``); the API key
from $BULWARK_API_KEY, else the config file's ``api_key``. The config file is TOML,
``~/.config/bulwark/config.toml`` (``$XDG_CONFIG_HOME/bulwark/config.toml`` where that is set)
or ``--config FILE``::

    url = "https://bulwark.example.com"
    api_key = "bwk_..."

``--json`` (on every command) prints the answer's JSON on stdout, and an error's problem
details; progress bars and messages go to stderr.

Exit codes:
  0  done (a watched job succeeded; an audit's verdict passed)
  1  a watched job failed or was cancelled, or an audit's verdict failed
  2  usage: bad flags, an unreadable file, a request refused as invalid (locally or by the
     server's 422), no URL
  3  a watched audit's verdict is inconclusive (too few instances to decide)
  4  the server refused (401, 403, 404, 409, 413, 415, 429, 5xx) or could not be reached
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bulwark.commands.audit import _attacks, _counts, _deltas, _pair_sets, _pairs
from bulwark.commands.requests import (
    given,
    option_names,
    report_errors,
    set_values,
    split_argument,
)
from catalog import ARCHS, ATTACKS, DATASET_FORMATS, DATASETS, DEFENSES, RECIPES

if TYPE_CHECKING:
    from bulwark.client import BulwarkClient, Job

OK, FAILED, USAGE, INCONCLUSIVE, SERVER = 0, 1, 2, 3, 4
VERDICT_EXIT = {"pass": OK, "fail": FAILED, "inconclusive": INCONCLUSIVE}
CONFIG_NAME = Path("bulwark") / "config.toml"


class UsageError(Exception):
    """A problem with what the user gave (exit 2), named by its flag or file."""


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base) if base else Path.home() / ".config") / CONFIG_NAME


# ------------------------------------------------------------------------------- parsers


def _connection(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--url``, ``--config``, ``--json``, ``--timeout``, ``--retries``: on ``remote`` itself
    and on every leaf command; a leaf's defaults are suppressed so either place works."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("connection")
    group.add_argument(
        "--url", default=default(None), help="the service's base URL (default: $BULWARK_URL)"
    )
    group.add_argument(
        "--config",
        type=Path,
        default=default(None),
        metavar="FILE",
        help="TOML with url and api_key (default: ~/.config/bulwark/config.toml)",
    )
    group.add_argument(
        "--timeout", type=float, default=default(60.0), help="seconds per HTTP request (60)"
    )
    group.add_argument(
        "--retries",
        type=int,
        default=default(3),
        help="retries on 503, 429 and lost connections (3)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the answer as JSON on stdout (errors as problem details)",
    )


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection(parser, top=True)
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def leaf(
        owner: argparse._SubParsersAction,
        leaf_name: str,
        handler: Callable[[BulwarkClient, argparse.Namespace], int],
        help_text: str,
    ) -> argparse.ArgumentParser:
        command = owner.add_parser(leaf_name, help=help_text, description=help_text)
        _connection(command, top=False)
        command.set_defaults(handler=handler, prog=command.prog.removeprefix("bulwark "))
        return command

    submit = groups.add_parser("submit", help="submit a pre-training or audit job")
    kinds = submit.add_subparsers(dest="kind", required=True, metavar="KIND")
    _pretrain_flags(leaf(kinds, "pretrain", submit_pretrain, "submit a pre-training job"))
    _audit_flags(leaf(kinds, "audit", submit_audit, "submit an audit of one of your models"))

    watch = leaf(groups, "watch", watch_job, "follow a job until it finishes (a progress bar)")
    watch.add_argument("job", metavar="JOB", help="the job's id")
    watch.add_argument("--no-progress", action="store_true", help="no progress bar")
    watch.add_argument("--timeout-wait", type=float, help="give up after SECONDS (exit 4)")
    cancel = leaf(groups, "cancel", cancel_job, "ask a queued or running job to stop")
    cancel.add_argument("job", metavar="JOB", help="the job's id")

    get = groups.add_parser("get", help="read a job, a report, a model's weights or card")
    things = get.add_subparsers(dest="thing", required=True, metavar="WHAT")
    job = leaf(things, "job", get_job, "a job's state")
    job.add_argument("job", metavar="JOB", help="the job's id")
    report = leaf(things, "report", get_report, "an audit's signed report (bulwark verify)")
    report.add_argument("job", metavar="JOB", help="the audit job's id")
    report.add_argument("--out", type=Path, metavar="FILE", help="write the report's JSON here")
    weights = leaf(things, "weights", get_weights, "a model's weights, sha256-checked")
    weights.add_argument("model", metavar="MODEL", help="the model's id")
    weights.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        metavar="PATH",
        help="a file, or a folder to write the server's file name in (the current one)",
    )
    card = leaf(things, "card", get_card, "a model's Hugging Face model card (markdown)")
    card.add_argument("model", metavar="MODEL", help="the model's id")
    card.add_argument("--out", type=Path, metavar="FILE", help="write the card here")

    for group_name, handler in (("models", list_models), ("datasets", list_datasets)):
        group = groups.add_parser(group_name, help=f"list your {group_name}")
        actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
        listing = leaf(actions, "list", handler, f"list your {group_name}")
        listing.add_argument("--limit", type=int, default=50, help="at most N (50)")
        listing.add_argument("--offset", type=int, default=0, help="skip the first N (0)")

    upload = groups.add_parser("upload", help="upload a model or a dataset")
    uploads = upload.add_subparsers(dest="thing", required=True, metavar="WHAT")
    model = leaf(uploads, "model", upload_model, "upload an extractor")
    model.add_argument(
        "path", type=Path, metavar="PATH", help=".safetensors, a torch .pt state dict, .pt2, .onnx"
    )
    model.add_argument("--input-shape", metavar="C,H,W", help="the model's image shape")
    model.add_argument("--arch", choices=ARCHS.names(), help="for safetensors and .pt files")
    model.add_argument("--name", help="the model's name")
    model.add_argument("--classes", metavar="JSON", help='class names, e.g. ["cat", "dog"]')
    model.add_argument("--mean", metavar="M,M,M", help="normalization mean per channel")
    model.add_argument("--std", metavar="S,S,S", help="normalization std per channel")
    model.add_argument(
        "--output",
        choices=("features", "logits"),
        help="what a .pt2 or .onnx model outputs (the server's default: features)",
    )
    model.add_argument(
        "--no-wait", action="store_true", help="print the import job instead of waiting for it"
    )
    dataset = leaf(uploads, "dataset", upload_dataset, "upload a dataset")
    dataset.add_argument(
        "path", type=Path, metavar="PATH", help=".npz, .zip or .tar(.gz) image folder, CIFAR tar"
    )
    dataset.add_argument(
        "--format", choices=DATASET_FORMATS.names(), help="the default: from the file name"
    )
    dataset.add_argument("--name", help="the dataset's name")
    dataset.add_argument(
        "--no-wait", action="store_true", help="print it pending instead of waiting until ready"
    )

    policy = groups.add_parser("policy", help="read or store your audit policy")
    actions = policy.add_subparsers(dest="action", required=True, metavar="ACTION")
    leaf(actions, "get", get_policy, "the policy in force")
    put = leaf(actions, "put", put_policy, "store a new version of your policy")
    put.add_argument("file", type=Path, metavar="FILE", help="the policy's JSON (docs/policy.md)")

    parser.set_defaults(run=run)


def _dataset_flags(parser: argparse.ArgumentParser) -> None:
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--dataset", help=f"a built-in dataset: {', '.join(DATASETS)}")
    data.add_argument("--dataset-id", metavar="ID", help="one of your ready datasets")


def _request_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json-body",
        type=Path,
        metavar="FILE",
        help="the full request as JSON; the flags given override its fields",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="an override of the config, e.g. --set lr=0.05",
    )
    parser.add_argument(
        "--wait", action="store_true", help="then follow the job as watch does (its exit code)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar with --wait")


def _pretrain_flags(parser: argparse.ArgumentParser) -> None:
    _dataset_flags(parser)
    parser.add_argument("--arch", choices=ARCHS.names(), help="the server's default: resnet18")
    parser.add_argument("--defense", choices=DEFENSES.names())
    parser.add_argument("--recipe", choices=RECIPES.names(), help="the dataset's paper recipe")
    parser.add_argument("--epochs", type=int, help="scale the recipe to N epochs")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--name", help="the name of the model it makes")
    _request_flags(parser)
    parser.set_defaults(flags=option_names(parser))


def _audit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-id", metavar="ID", help="the audited model (required)")
    _dataset_flags(parser)
    parser.add_argument("--attacks", type=_attacks, help=f"comma-separated, of {','.join(ATTACKS)}")
    parser.add_argument(
        "--attack-set",
        dest="attack_settings",
        action="append",
        default=[],
        metavar="ATTACK.FIELD=VALUE",
        help="an attack's setting, e.g. --attack-set bp.poisons=10",
    )
    parser.add_argument("--pairs", type=_pairs, help="explicit TARGET:POISON pairs, e.g. 0:7,2:1")
    parser.add_argument("--pair-sets", type=_pair_sets, metavar="SET,...")
    parser.add_argument("--closest-pairs", type=int)
    parser.add_argument("--random-pairs", type=int)
    parser.add_argument(
        "--reference", metavar="auto|none|MODEL", help="the undefended reference (auto)"
    )
    parser.add_argument("--budget-deltas", type=_deltas, metavar="D,...")
    parser.add_argument("--budget-poisons", type=_counts, metavar="K,...")
    parser.add_argument("--budget-attack")
    parser.add_argument("--targets-per-pair", type=int)
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--delta", type=float, help="l_inf budget in [0,1] pixels")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--retrain-epochs", type=int, help="an override of the config")
    parser.add_argument("--split", type=split_argument, help="PRETRAIN:RETRAIN:POOL per class")
    parser.add_argument("--eval-images", type=int, help="test images for Pre./Re. Acc")
    _request_flags(parser)
    parser.set_defaults(flags=option_names(parser))


# ---------------------------------------------------------------------------- connection


def connection(args: argparse.Namespace) -> tuple[str, str | None]:
    """(URL, API key) from the flags, the environment and the config file, in that order."""
    path = args.config or default_config_path()
    config: dict[str, Any] = {}
    if args.config is not None or path.is_file():
        try:
            config = tomllib.loads(path.read_text())
        except OSError as error:
            raise UsageError(f"--config: cannot read {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise UsageError(f"--config {path}: not TOML: {error}") from None
        unknown = sorted(set(config) - {"url", "api_key"})
        if unknown:
            raise UsageError(f"--config {path}: unknown keys {unknown} (url, api_key)")
    url = args.url or os.environ.get("BULWARK_URL") or config.get("url")
    if not url:
        raise UsageError("no service URL: give --url, set BULWARK_URL or url in the config file")
    key = os.environ.get("BULWARK_API_KEY") or config.get("api_key")
    return str(url), (str(key) if key else None)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from bulwark.client import BulwarkClient, BulwarkError, InvalidRequest, JobFailed

    where = f"bulwark {args.prog}"
    try:
        url, key = connection(args)
    except UsageError as error:
        print(f"{where}: {error}", file=sys.stderr)
        return USAGE
    if args.retries < 0 or args.timeout <= 0:
        print(f"{where}: --retries must be >= 0 and --timeout > 0", file=sys.stderr)
        return USAGE
    with BulwarkClient(url, key, timeout=args.timeout, retries=args.retries) as client:
        try:
            return int(args.handler(client, args))
        except UsageError as error:
            for line in str(error).splitlines():
                print(f"{where}: {line}", file=sys.stderr)
            return USAGE
        except ValidationError as error:
            return report_errors(
                args.prog.removeprefix("bulwark "),
                [dict(e) for e in error.errors()],
                getattr(args, "flags", set()),
            )
        except JobFailed as error:
            _print_problem(args, where, error)
            return FAILED
        except InvalidRequest as error:
            _print_problem(args, where, error)
            return USAGE
        except BulwarkError as error:
            _print_problem(args, where, error)
            return SERVER


def _print_problem(args: argparse.Namespace, where: str, error: Any) -> None:
    if args.json:
        print(json.dumps(error.problem(), indent=2))
    print(f"{where}: {error.message}", file=sys.stderr)
    for field in error.errors:
        loc = ".".join(str(part) for part in field["loc"] if part != "body")
        print(f"{where}: {loc}: {field['msg']}", file=sys.stderr)


def _emit(args: argparse.Namespace, value: Any, text: str) -> None:
    print(json.dumps(value, indent=2) if args.json else text)


# ------------------------------------------------------------------------------ requests


def _json_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.json_body is None:
        return {}
    try:
        body = json.loads(args.json_body.read_text())
    except OSError as error:
        raise UsageError(f"--json-body: cannot read {args.json_body}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--json-body {args.json_body}: not JSON: {error}") from None
    if not isinstance(body, dict):
        raise UsageError(f"--json-body {args.json_body}: expected a JSON object")
    return body


def _overrides(args: argparse.Namespace, body: dict[str, Any], **flags: Any) -> dict[str, Any]:
    try:
        extra = set_values(args.settings)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return {**body.get("overrides", {}), **given(**flags), **extra}


def pretrain_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request of ``submit pretrain``: --json-body, the flags given over it; validated
    (``pydantic.ValidationError``) before anything is sent."""
    from catalog.requests import PretrainJobCreate

    body = _json_body(args)
    body |= given(
        dataset=args.dataset,
        dataset_id=args.dataset_id,
        arch=args.arch,
        defense=args.defense,
        recipe=args.recipe,
        epochs=args.epochs,
        seed=args.seed,
        name=args.name,
    )
    overrides = _overrides(args, body)
    if overrides:
        body["overrides"] = overrides
    PretrainJobCreate.model_validate(body)
    return body


def audit_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request of ``submit audit``, as :func:`pretrain_body`."""
    from bulwark.commands.audit import _attack_settings
    from catalog.requests import AuditJobCreate

    body = _json_body(args)
    try:
        settings = _attack_settings(args.attack_settings)
    except ValueError as error:
        raise UsageError(str(error)) from None
    budget = given(
        attack=args.budget_attack, deltas=args.budget_deltas, poisons=args.budget_poisons
    )
    body |= given(
        model_id=args.model_id,
        dataset=args.dataset,
        dataset_id=args.dataset_id,
        attacks=args.attacks,
        attack_settings=settings or None,
        pairs=args.pairs,
        pair_sets=args.pair_sets,
        closest_pairs=args.closest_pairs,
        random_pairs=args.random_pairs,
        reference=args.reference,
        budget=budget or None,
        targets_per_pair=args.targets_per_pair,
        iterations=args.iterations,
        delta=args.delta,
        seed=args.seed,
    )
    overrides = _overrides(
        args,
        body,
        retrain_epochs=args.retrain_epochs,
        split=args.split,
        eval_images=args.eval_images,
    )
    if overrides:
        body["overrides"] = overrides
    AuditJobCreate.model_validate(body)
    return body


def submit_pretrain(client: BulwarkClient, args: argparse.Namespace) -> int:
    job = client.submit_pretrain(pretrain_body(args))
    return _submitted(client, args, job)


def submit_audit(client: BulwarkClient, args: argparse.Namespace) -> int:
    job = client.submit_audit(audit_body(args))
    return _submitted(client, args, job)


def _submitted(client: BulwarkClient, args: argparse.Namespace, job: Job) -> int:
    if args.wait:
        if not args.json:
            print(f"job {job.id} ({job.kind}) {job.status}", file=sys.stderr)
        return _follow(client, args, job.id)
    _emit(args, job.model_dump(mode="json"), f"job {job.id} ({job.kind}) {job.status}")
    return OK


# --------------------------------------------------------------------------------- jobs


def watch_job(client: BulwarkClient, args: argparse.Namespace) -> int:
    return _follow(client, args, args.job)


def _follow(client: BulwarkClient, args: argparse.Namespace, job_id: str) -> int:
    """Wait for the job; its exit code (an audit's by its verdict)."""
    timeout = getattr(args, "timeout_wait", None) or 24 * 3600.0
    job = client.wait(
        job_id, progress=not (args.json or args.no_progress), timeout=timeout, bar_file=sys.stderr
    )
    outcome = None
    if job.succeeded and job.kind == "audit":
        verdict = client.report(job.id)["body"].get("verdict")
        outcome = verdict["outcome"] if verdict else None
        if verdict and not args.json:
            print(f"verdict: {outcome}: {verdict.get('reason', '')}")
    result = job.model_dump(mode="json") | ({"verdict": outcome} if outcome else {})
    line = f"job {job.id} ({job.kind}) {job.status}"
    if job.error:
        line += f": {job.error}"
    elif job.result_model_id:
        line += f": model {job.result_model_id}"
    elif job.report_url:
        line += f": report {job.report_url}"
    _emit(args, result, line)
    if not job.succeeded:
        return FAILED
    return VERDICT_EXIT.get(outcome, OK) if outcome else OK


def cancel_job(client: BulwarkClient, args: argparse.Namespace) -> int:
    job = client.cancel(args.job)
    _emit(args, job.model_dump(mode="json"), f"job {job.id} {job.status} (cancel requested)")
    return OK


def get_job(client: BulwarkClient, args: argparse.Namespace) -> int:
    job = client.job(args.job)
    text = f"job {job.id} ({job.kind}) {job.status} {100 * job.progress:.1f}% {job.phase}"
    _emit(args, job.model_dump(mode="json"), text + (f": {job.error}" if job.error else ""))
    return OK


def get_report(client: BulwarkClient, args: argparse.Namespace) -> int:
    report = client.report(args.job)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    verdict = report["body"].get("verdict")
    lines = [
        f"report {report['id']} of job {report['job_id']} (model {report.get('model_id')})",
        *(
            f"{name}: ASR {100 * attack['asr']:.1f}% ({attack.get('successes', '?')}/"
            f"{attack.get('instances', '?')})"
            for name, attack in report["body"].get("attacks", {}).items()
        ),
    ]
    if verdict:
        lines.append(f"verdict: {verdict['outcome']}: {verdict.get('reason', '')}")
    if args.out is not None:
        lines.append(f"written to {args.out} (check it with bulwark verify)")
    _emit(args, report, "\n".join(lines))
    return OK


def get_weights(client: BulwarkClient, args: argparse.Namespace) -> int:
    path = client.download_weights(args.model, args.out)
    model = client.model(args.model)
    _emit(
        args,
        {"path": str(path), "sha256": model["sha256"], "model": model},
        f"{path} (sha256 {model['sha256']}, checked)",
    )
    return OK


def get_card(client: BulwarkClient, args: argparse.Namespace) -> int:
    card = client.card(args.model)
    if args.out is not None:
        args.out.write_text(card)
    if args.json:
        print(json.dumps({"model_id": args.model, "card": card}, indent=2))
    elif args.out is not None:
        print(f"card written to {args.out}")
    else:
        print(card, end="" if card.endswith("\n") else "\n")
    return OK


# ------------------------------------------------------------------------ models, datasets


def list_models(client: BulwarkClient, args: argparse.Namespace) -> int:
    page = client.models(limit=args.limit, offset=args.offset)
    lines = [
        f"{m['id']}  {m['name']}  {m['arch']}  {m['num_classes']} classes  "
        f"sha256 {m['sha256'][:12]}"
        for m in page["items"]
    ]
    _emit(args, page, "\n".join([*lines, f"{len(lines)} of {page['total']}"]))
    return OK


def list_datasets(client: BulwarkClient, args: argparse.Namespace) -> int:
    page = client.datasets(limit=args.limit, offset=args.offset)
    lines = [
        f"{d['id']}  {d['name']}  {d['format']}  {d['status']}"
        + (f": {d['error']}" if d.get("error") else "")
        for d in page["items"]
    ]
    _emit(args, page, "\n".join([*lines, f"{len(lines)} of {page['total']}"]))
    return OK


def _readable(path: Path) -> Path:
    if not path.is_file():
        raise UsageError(f"no file {path}")
    return path


def upload_model(client: BulwarkClient, args: argparse.Namespace) -> int:
    answer = client.upload_model(
        _readable(args.path),
        wait=not args.no_wait,
        progress=not (args.json or args.no_wait),
        input_shape=args.input_shape,
        arch=args.arch,
        name=args.name,
        classes=args.classes,
        mean=args.mean,
        std=args.std,
        output=args.output,
    )
    if "sha256" in answer:
        text = f"model {answer['id']} ({answer['name']}, {answer['arch']})"
    else:
        text = f"import job {answer['id']} {answer['status']}"
    _emit(args, answer, text)
    return OK


def upload_dataset(client: BulwarkClient, args: argparse.Namespace) -> int:
    dataset = client.upload_dataset(
        _readable(args.path),
        wait=not args.no_wait,
        progress=not (args.json or args.no_wait),
        format=args.format,
        name=args.name,
    )
    _emit(args, dataset, f"dataset {dataset['id']} ({dataset['name']}) {dataset['status']}")
    return OK


# -------------------------------------------------------------------------------- policy


def get_policy(client: BulwarkClient, args: argparse.Namespace) -> int:
    policy = client.policy()
    version = "Bulwark's default" if policy.get("default") else f"version {policy.get('version')}"
    _emit(args, policy, f"policy in force: {version}\n{json.dumps(policy['policy'], indent=2)}")
    return OK


def put_policy(client: BulwarkClient, args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from catalog.policy import Policy

    try:
        policy = Policy.model_validate_json(args.file.read_text())
    except OSError as error:
        raise UsageError(f"cannot read {args.file}: {error.strerror}") from None
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            loc = ".".join(str(part) for part in problem["loc"])
            message = str(problem["msg"]).removeprefix("Value error, ")
            lines.append(f"{args.file}: {loc + ': ' if loc else ''}{message}")
        raise UsageError("\n".join(lines)) from None
    stored = client.put_policy(policy)
    _emit(args, stored, f"policy version {stored.get('version')} stored, in force from now on")
    return OK
