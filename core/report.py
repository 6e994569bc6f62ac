"""The audit report: a versioned pydantic model, and the one renderer of it (torch-free).

``core.audit.run_audit`` returns an :class:`AuditReport`; the API serves it as its response
model, the worker stores it, and the CLI table, the model card and the benchmark tables all
render it with :func:`render_asr_table` and the cell formatters below.

Schema history: ``bulwark-audit/1`` had flat attack settings in ``config`` (``fc_mu``,
``polytope_lr`` ...); ``bulwark-audit/2`` keeps them per attack in ``config.attack_settings``
and is otherwise the same document. :func:`read_report` reads both (a /1 report keeps its
config as it was written). The optional ``verdict`` (a policy's outcome, ``core.verdict``)
was added within /2: a report without it reads with ``verdict`` None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.verdict import Verdict

SchemaVersion = Literal["bulwark-audit/1", "bulwark-audit/2"]
SCHEMA_VERSION: SchemaVersion = "bulwark-audit/2"
READABLE_VERSIONS = ("bulwark-audit/1", SCHEMA_VERSION)


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MeanStd(_Part):
    mean: float
    std: float


class InstanceDraw(_Part):
    """One instance as drawn: a test-set target and the training-set indices of its bases."""

    target_index: int
    target_class: int
    poison_class: int
    base_indices: list[int]


class InstanceResult(_Part):
    """One instance under one attack: poisoned and baseline re-training, and how close it got."""

    instance: int
    target_index: int
    target_class: int
    poison_class: int
    base_indices: list[int]
    success: bool
    predicted_class: int
    poison_class_probability: float
    re_acc: float
    feature_distance: float
    relative_feature_distance: float
    linf: float
    coefficients: list[float]
    objective_start: float
    objective_end: float
    baseline_success: bool
    baseline_poison_class_probability: float
    baseline_re_acc: float


class BaselineResult(_Part):
    """The same re-training with the unperturbed bases in place of the poisons."""

    successes: int
    rate: float
    wilson95: tuple[float, float]
    re_acc: MeanStd


class AttackResult(_Part):
    attack: str
    poisons_per_instance: int
    instances: int
    successes: int
    asr: float
    asr_wilson95: tuple[float, float]
    baseline: BaselineResult
    re_acc: MeanStd
    feature_distance: MeanStd
    relative_feature_distance: MeanStd
    max_linf: float
    seconds: dict[str, float]
    rows: list[InstanceResult]


class ModelFacts(_Part):
    path: str
    arch: str
    feature_dim: int
    num_classes: int
    defense: str | None
    trained_on: str | None
    weights_sha256: str | None


class DatasetFacts(_Part):
    name: str
    classes: list[str]
    split: dict[str, int]
    retrain_images: int
    pool_images: int
    eval_images: int


class ScreenFacts(_Part):
    """The Eq. 4a/4b feature-space screen (``core.screen``)."""

    separation: float
    drift: float
    normalized_drift: float
    images: int
    pgd_steps: int
    delta: float


class AuditReport(_Part):
    """An audit's full result: the protocol it ran, per-attack ASR, and every instance."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    created_at: str
    model: ModelFacts
    dataset: DatasetFacts
    pre_acc: float | None  # clean test accuracy of the model's own head, where it fits
    pre_acc_source: Literal["measured", "manifest"] | None
    head_init: Literal["pretrained", "fresh"]
    config: dict[str, Any]  # the resolved core.config.AuditConfig
    seed: int
    device: str
    precision: str
    instances: list[InstanceDraw]
    attacks: dict[str, AttackResult]
    screen: ScreenFacts | None
    timings: dict[str, float]
    versions: dict[str, str]
    stored_artifacts: list[str] = Field(default_factory=list)  # artifact keys (service only)
    # The verdict under a tenant's policy (core.verdict.decide), where one was given; absent
    # from reports written before policies existed, which read as None.
    verdict: Verdict | None = None

    def write(self, path: Path) -> None:
        """Indented JSON, atomically (a temporary file renamed into place)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(self.model_dump_json(indent=2) + "\n")
        partial.replace(path)


def read_report(source: Path | str | dict[str, Any]) -> AuditReport:
    """A report from a file, a JSON string or a parsed dict (schema /1 or /2)."""
    if isinstance(source, Path):
        source = source.read_text()
    if isinstance(source, str):
        return AuditReport.model_validate_json(source)
    return AuditReport.model_validate(source)


# ---- rendering: every table of a report goes through these -----------------------------------


def percent(rate: float, digits: int = 1) -> str:
    return f"{100 * rate:.{digits}f}%"


def asr_cell(result: AttackResult) -> str:
    """'12.5% (5/40)'."""
    return f"{percent(result.asr)} ({result.successes}/{result.instances})"


def interval_cell(interval: tuple[float, float]) -> str:
    """'[3.9, 26.6]', in percent."""
    low, high = interval
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def re_acc_cell(value: MeanStd) -> str:
    """'89.35±0.62', in percent."""
    return f"{100 * value.mean:.2f}±{100 * value.std:.2f}"


def screen_line(screen: ScreenFacts) -> str:
    return (
        f"feature screen ({screen.images} test images, PGD-{screen.pgd_steps} at delta "
        f"{screen.delta:.4f}): separation {screen.separation:.3f} (Eq. 4a, larger resists "
        f"better), normalized drift {screen.normalized_drift:.3f} (Eq. 4b, smaller resists "
        "better)"
    )


ASR_COLUMNS = ("attack", "ASR", "95% CI", "baseline", "Re. Acc")


def asr_rows(report: AuditReport) -> list[tuple[str, ...]]:
    """One row per attack: the cells of :data:`ASR_COLUMNS`."""
    return [
        (
            name.upper(),
            asr_cell(r),
            interval_cell(r.asr_wilson95),
            percent(r.baseline.rate),
            re_acc_cell(r.re_acc),
        )
        for name, r in report.attacks.items()
    ]


def protocol_line(report: AuditReport) -> str:
    """'40 instances over pairs [[1, 2]], delta 0.0314, ...': how the numbers were measured."""
    config = report.config
    return (
        f"{len(report.instances)} instances over pairs {config.get('pairs')}, delta "
        f"{config.get('delta', 0):.4f}, {config.get('iterations')} iterations, head "
        f"re-trained {config.get('retrain_epochs')} epochs ({report.head_init} head)"
    )


def render_asr_table(report: AuditReport, *, markdown: bool = False) -> str:
    """The report's summary: the model line, the ASR table, the screen and the protocol.

    Plain text (aligned columns) for a terminal, or markdown for a card or a document.
    """
    model = report.model
    pre_acc = "?" if report.pre_acc is None else percent(report.pre_acc, 2)
    protocol = protocol_line(report)
    head = (
        f"model {model.path} ({model.arch}, defense {model.defense or '?'}), "
        f"Pre. Acc {pre_acc}; dataset {report.dataset.name}"
    )
    rows = asr_rows(report)
    lines: list[str]
    if markdown:
        lines = [head, "", "| " + " | ".join(ASR_COLUMNS) + " |"]
        lines.append("|" + "---|" * len(ASR_COLUMNS))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    else:
        widths = [
            max(len(str(c)) for c in column) for column in zip(ASR_COLUMNS, *rows, strict=False)
        ]
        lines = [head]
        for row in [ASR_COLUMNS, *rows]:
            lines.append(
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            )
    lines.append(f"protocol: {protocol}")
    if report.screen is not None:
        lines.append(screen_line(report.screen))
    return "\n".join(lines)
