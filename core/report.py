"""The audit report: a versioned pydantic model, and the one renderer of it (torch-free).

``core.audit.run_audit`` returns an :class:`AuditReport`; the API serves it as its response
model, the worker stores it, and the CLI table, the model card and the benchmark tables all
render it with :func:`render_asr_table` and the cell formatters below.

Schema history: ``bulwark-audit/1`` had flat attack settings in ``config`` (``fc_mu``,
``polytope_lr`` ...); ``bulwark-audit/2`` keeps them per attack in ``config.attack_settings``
and is otherwise the same document. :func:`read_report` reads both (a /1 report keeps its
config as it was written). The optional ``verdict`` (a policy's outcome, ``core.verdict``)
was added within /2: a report without it reads with ``verdict`` None. ``bulwark-audit/3`` adds
what makes a number comparable: the pairs and how they were chosen (``pair_choices``), ASR per
pair and among the targets the clean model classifies correctly (the headline), the reach of
the poisons, the undefended ``reference`` audited on the same instances with the
``comparison`` (model minus reference, with an interval) and the optional ``budget_curve``;
every addition has a default, so /1 and /2 reports still read.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from catalog.stored import IGNORE_NEWER_FIELDS, StoredModel
from core.verdict import UNION, Verdict

SchemaVersion = Literal["bulwark-audit/1", "bulwark-audit/2", "bulwark-audit/3"]
SCHEMA_VERSION: SchemaVersion = "bulwark-audit/3"
READABLE_VERSIONS = ("bulwark-audit/1", "bulwark-audit/2", SCHEMA_VERSION)
PairSource = Literal["explicit", "closest", "paper", "random"]


class MeanStd(StoredModel):
    mean: float
    std: float


class Rate(StoredModel):
    """A binomial rate with its 95% Wilson interval."""

    successes: int
    trials: int
    rate: float
    wilson95: tuple[float, float]


class PairChoice(StoredModel):
    """One (target class, poison class) pair of the audit and the set that chose it.

    ``score`` is what ranked it: for ``closest``, the mean probability the clean model gives
    the poison class on test images of the target class (its confusion); None otherwise.
    """

    target_class: int
    poison_class: int
    source: PairSource
    score: float | None = None


class PairResult(StoredModel):
    """One attack's ASR and clean baseline over the instances of one pair."""

    target_class: int
    poison_class: int
    source: PairSource
    asr: Rate
    baseline: Rate


class InstanceDraw(StoredModel):
    """One instance as drawn: a test-set target and the training-set indices of its bases."""

    target_index: int
    target_class: int
    poison_class: int
    base_indices: list[int]
    # Whether the clean model (its head re-trained on the clean set alone) already classifies
    # the target correctly; None in reports written before /3.
    clean_correct: bool | None = None


class InstanceResult(StoredModel):
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


class BaselineResult(StoredModel):
    """The same re-training with the unperturbed bases in place of the poisons."""

    successes: int
    rate: float
    wilson95: tuple[float, float]
    re_acc: MeanStd


class AttackResult(StoredModel):
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
    # /3: the headline, ASR among the targets the clean model classifies correctly (a target
    # it already puts in the poison class is no evidence of poisoning), and its baseline.
    asr_correct_targets: Rate | None = None
    baseline_correct_targets: Rate | None = None
    pairs: list[PairResult] = Field(default_factory=list)
    # Reach: instances whose poisons ended with a relative feature distance to the target
    # above ``reach_level`` never came near it; the attack was then not at full strength and
    # its ASR is a lower bound.
    reach_level: float | None = None
    unreached: int = 0
    # Among the headline's instances: (poisoned head won and baseline did not, the reverse);
    # ASR - baseline = (first - second) / trials, what the verdict's paired bounds read.
    discordant: tuple[int, int] | None = None
    # Poison forward-backward passes the crafting took (instances x poisons x iterations,
    # less what stopping succeeded instances early saved); 0 in reports before /3.
    crafting_work: int = 0

    @property
    def headline(self) -> Rate:
        """ASR among correctly classified targets where known, else over all instances."""
        if self.asr_correct_targets is not None:
            return self.asr_correct_targets
        return Rate(
            successes=self.successes,
            trials=self.instances,
            rate=self.asr,
            wilson95=self.asr_wilson95,
        )

    @property
    def headline_baseline(self) -> Rate:
        if self.baseline_correct_targets is not None:
            return self.baseline_correct_targets
        return Rate(
            successes=self.baseline.successes,
            trials=self.instances,
            rate=self.baseline.rate,
            wilson95=self.baseline.wilson95,
        )

    @property
    def asr_is_lower_bound(self) -> bool:
        return self.unreached > 0


class UnionResult(StoredModel):
    """The worst case over the audit's attacks: an instance is lost if any attack wins it.

    ``asr`` is the headline (targets the clean model classifies correctly), ``asr_all`` over
    every instance; ``baseline`` counts the headline's instances where any attack's baseline
    re-training (its unperturbed bases) already put the target in the poison class, and
    ``discordant`` the instances some attack won while no baseline did, and the reverse.
    """

    attacks: list[str]
    asr: Rate
    asr_all: Rate
    baseline: Rate
    discordant: tuple[int, int]

    @property
    def headline(self) -> Rate:
        return self.asr

    @property
    def headline_baseline(self) -> Rate:
        return self.baseline


class ModelFacts(StoredModel):
    path: str
    arch: str
    feature_dim: int
    num_classes: int
    defense: str | None
    trained_on: str | None
    weights_sha256: str | None


class DatasetFacts(StoredModel):
    name: str
    classes: list[str]
    split: dict[str, int]
    retrain_images: int
    pool_images: int
    eval_images: int


class ScreenFacts(StoredModel):
    """The Eq. 4a/4b feature-space screen (``core.screen``)."""

    separation: float
    drift: float
    normalized_drift: float
    images: int
    pgd_steps: int
    delta: float


class ReferenceFacts(StoredModel):
    """The undefended reference audited on the same instances as the model."""

    model: ModelFacts
    source: Literal["named", "auto"]  # named by the tenant, or pre-trained by Bulwark
    pre_acc: float | None
    head_init: Literal["pretrained", "fresh"]
    instances_correct: int  # instances whose target the reference's clean model gets right
    attacks: dict[str, AttackResult]
    union: UnionResult | None = None


class Comparison(StoredModel):
    """One attack on the model and on the reference: the headline pair and its difference.

    Both rates are the headline (correctly classified targets of each model); ``difference``
    is model minus reference with Newcombe's hybrid-score 95% interval (independent rates).
    """

    attack: str
    model: Rate
    reference: Rate
    difference: float
    difference95: tuple[float, float]


class BudgetPoint(StoredModel):
    """One attacker budget and what the curve's attack achieved with it."""

    delta: float  # l_inf budget in [0,1] pixels
    poisons: int  # poisons per instance
    model: Rate  # headline ASR of the model at this budget
    model_baseline: Rate
    reference: Rate | None = None  # the same on the reference, where the audit has one


class BudgetCurve(StoredModel):
    """ASR as the attacker's budget moves: a sweep of delta (at the audit's poisons) and a
    sweep of poisons per instance (at the audit's delta), for one attack."""

    attack: str
    delta_points: list[BudgetPoint]
    poisons_points: list[BudgetPoint]


class SequentialFacts(StoredModel):
    """How a sequential audit ran: the rounds crafted, why it stopped, the work it took.

    Work counts poison forward-backward passes through the extractor (instances x poisons x
    iterations, model and reference): ``crafting_work_full`` is what crafting every planned
    instance for every iteration would have taken.
    """

    rounds_planned: int
    rounds_run: int
    instances_planned: int
    instances_run: int
    look_confidence: float  # the per-look confidence: Bonferroni over the planned rounds
    stopped: str
    early_stop_every: int
    crafting_work: int
    crafting_work_full: int

    @property
    def work_fraction(self) -> float:
        return self.crafting_work / self.crafting_work_full if self.crafting_work_full else 1.0


class AuditReport(StoredModel):
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
    # /3 (each defaults to "absent" so older reports read)
    pair_choices: list[PairChoice] = Field(default_factory=list)
    reference: ReferenceFacts | None = None
    reference_note: str | None = None  # why the audit has no reference, where it has none
    comparison: dict[str, Comparison] = Field(default_factory=dict)
    budget_curve: BudgetCurve | None = None
    sequential: SequentialFacts | None = None
    # The worst case over the attacks (two or more): what the verdict also checks.
    union: UnionResult | None = None

    def write(self, path: Path) -> None:
        """Indented JSON, atomically (a temporary file renamed into place)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(self.model_dump_json(indent=2) + "\n")
        partial.replace(path)


def read_report(
    source: Path | str | dict[str, Any], *, newer_fields: Literal["refuse", "ignore"] = "refuse"
) -> AuditReport:
    """A report from a file, a JSON string or a parsed dict (schema /1, /2 or /3).

    A field this version does not know is refused (a ``pydantic.ValidationError``), unless
    ``newer_fields`` is ``ignore``: then it is dropped at any level, as the API does with the
    reports its workers stored (a worker newer than the API, during a rolling deploy, writes
    fields the API cannot show; ``catalog.stored``)."""
    context = IGNORE_NEWER_FIELDS if newer_fields == "ignore" else None
    if isinstance(source, Path):
        source = source.read_text()
    if isinstance(source, str):
        return AuditReport.model_validate_json(source, context=context)
    return AuditReport.model_validate(source, context=context)


# ---- rendering: every table of a report goes through these -----------------------------------


def percent(rate: float, digits: int = 1) -> str:
    return f"{100 * rate:.{digits}f}%"


def asr_cell(result: AttackResult) -> str:
    """'12.5% (5/40)': ASR over all instances."""
    return f"{percent(result.asr)} ({result.successes}/{result.instances})"


def rate_cell(rate: Rate) -> str:
    """'12.5% (5/40)'."""
    return f"{percent(rate.rate)} ({rate.successes}/{rate.trials})"


def interval_cell(interval: tuple[float, float]) -> str:
    """'[3.9, 26.6]', in percent."""
    low, high = interval
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def difference_cell(difference: float, interval: tuple[float, float]) -> str:
    """'-17.5 pp [-35.2, 1.3]': a difference of two rates in percentage points."""
    return f"{100 * difference:+.1f} pp {interval_cell(interval)}"


def delta_cell(delta: float) -> str:
    """'8/255': an l_inf budget in [0,1] pixels, in the /255 units papers quote."""
    return f"{255 * delta:.4g}/255"


def re_acc_cell(value: MeanStd) -> str:
    """'89.35±0.62', in percent."""
    return f"{100 * value.mean:.2f}±{100 * value.std:.2f}"


def class_name(classes: list[str], index: int) -> str:
    """The dataset's name of a class index (the index itself where the dataset has none)."""
    return classes[index] if 0 <= index < len(classes) else str(index)


def pair_cell(classes: list[str], target_class: int, poison_class: int) -> str:
    """'Shirt -> T-shirt/top': a (target, poison) class pair by the classes' names."""
    return f"{class_name(classes, target_class)} -> {class_name(classes, poison_class)}"


def screen_line(screen: ScreenFacts) -> str:
    return (
        f"feature screen ({screen.images} test images, PGD-{screen.pgd_steps} at delta "
        f"{screen.delta:.4f}): separation {screen.separation:.3f} (Eq. 4a, larger resists "
        f"better), normalized drift {screen.normalized_drift:.3f} (Eq. 4b, smaller resists "
        "better)"
    )


LOWER_BOUND_MARK = "(lower bound)"
REFERENCE_COLUMNS = ("ref. ASR", "difference [95% CI]")
ASR_COLUMNS = ("attack", "ASR", "95% CI", *REFERENCE_COLUMNS, "baseline", "Re. Acc")
PAIR_COLUMNS = ("attack", "pair", "source", "ASR", "baseline")
BUDGET_COLUMNS = ("sweep", "delta", "poisons", "ASR", "ref. ASR", "baseline")


def shows_reference(report: AuditReport) -> bool:
    """Whether the report's tables have the reference columns: every /3 report does (a '-'
    where its audit had no reference, which its reference line explains); a /1 or /2 report
    keeps the table it was written with."""
    return (
        report.schema_version == SCHEMA_VERSION
        or report.reference is not None
        or bool(report.comparison)
    )


def asr_columns(report: AuditReport) -> tuple[str, ...]:
    """The columns of :func:`asr_rows` for this report: :data:`ASR_COLUMNS`, less the
    reference's for a report written before references existed."""
    if shows_reference(report):
        return ASR_COLUMNS
    return tuple(column for column in ASR_COLUMNS if column not in REFERENCE_COLUMNS)


def _reference_cells(report: AuditReport, attack: str) -> tuple[str, str]:
    comparison = report.comparison.get(attack)
    if comparison is not None:
        return (
            rate_cell(comparison.reference),
            difference_cell(comparison.difference, comparison.difference95),
        )
    if report.reference is not None and attack in report.reference.attacks:
        return rate_cell(report.reference.attacks[attack].headline), "-"
    if attack == UNION and report.reference is not None and report.reference.union is not None:
        return rate_cell(report.reference.union.headline), "-"
    return "-", "-"


def asr_rows(report: AuditReport) -> list[tuple[str, ...]]:
    """One row per attack: the cells of :func:`asr_columns`. The ASR is the headline (among
    the targets the clean model classifies correctly, where the report knows them), marked a
    lower bound where some instances' poisons never reached their target."""
    with_reference = shows_reference(report)
    rows = []
    for name, result in report.attacks.items():
        headline = result.headline
        asr = rate_cell(headline)
        if result.asr_is_lower_bound:
            asr += f" {LOWER_BOUND_MARK}"
        cells = [name.upper(), asr, interval_cell(headline.wilson95)]
        if with_reference:
            cells += _reference_cells(report, name)
        cells += [percent(result.headline_baseline.rate), re_acc_cell(result.re_acc)]
        rows.append(tuple(cells))
    union = report.union
    if union is not None:
        cells = [
            f"{UNION.upper()} ({'|'.join(a.upper() for a in union.attacks)})",
            rate_cell(union.asr),
            interval_cell(union.asr.wilson95),
        ]
        if with_reference:
            cells += _reference_cells(report, UNION)
        cells += [percent(union.baseline.rate), "-"]
        rows.append(tuple(cells))
    return rows


def reach_lines(report: AuditReport) -> list[str]:
    """One line per attack whose ASR is a lower bound: how many instances it did not reach."""
    return [
        f"{LOWER_BOUND_MARK} {name.upper()}: {result.unreached} of {result.instances} "
        "instances not reached (their poisons ended at a relative feature distance above "
        f"{'?' if result.reach_level is None else f'{result.reach_level:g}'} from the "
        "target), so its ASR is a lower bound"
        for name, result in report.attacks.items()
        if result.asr_is_lower_bound
    ]


def misclassified_line(report: AuditReport) -> str | None:
    """How many targets the headline leaves out because the clean model already got them
    wrong, and the ASR over all instances; None where the headline is over all instances."""
    results = [r for r in report.attacks.values() if r.asr_correct_targets is not None]
    if not results:
        return None
    known = [draw.clean_correct for draw in report.instances if draw.clean_correct is not None]
    if known:
        excluded, total = known.count(False), len(known)
    else:  # the draws do not say: the first attack's headline trials do
        first = results[0]
        assert first.asr_correct_targets is not None
        excluded, total = first.instances - first.asr_correct_targets.trials, first.instances
    overall = ", ".join(f"{n.upper()} {percent(r.asr)}" for n, r in report.attacks.items())
    return (
        f"{excluded} of {total} targets already misclassified by the clean model are excluded "
        f"from the headline (ASR over all instances: {overall})"
    )


def pair_choices_line(report: AuditReport) -> str | None:
    """'pairs: 3 -> 5 (closest, confusion 0.21), 1 -> 7 (random)': the pairs and what chose
    each; None for a report written before pair sets."""
    if not report.pair_choices:
        return None
    parts = []
    for choice in report.pair_choices:
        how: str = choice.source
        if choice.score is not None:
            label = "confusion" if choice.source == "closest" else "score"
            how += f", {label} {choice.score:.2f}"
        parts.append(f"{choice.target_class} -> {choice.poison_class} ({how})")
    return "pairs: " + ", ".join(parts)


def reference_line(report: AuditReport) -> str | None:
    """The reference the ASR is compared with (which model, named or auto, its Pre. Acc), or
    why there is none; None for a report written before references."""
    reference = report.reference
    if reference is None:
        if report.reference_note is not None:
            return f"reference: none ({report.reference_note})"
        return "reference: none" if shows_reference(report) else None
    model = reference.model
    source = (
        "named by the tenant"
        if reference.source == "named"
        else "pre-trained by Bulwark without a defense (auto)"
    )
    pre_acc = "?" if reference.pre_acc is None else percent(reference.pre_acc, 2)
    return (
        f"reference: {model.path} ({model.arch}, defense {model.defense or '?'}; {source}), "
        f"Pre. Acc {pre_acc}, {reference.head_init} head, audited on the same "
        f"{len(report.instances)} instances; its clean model classifies "
        f"{reference.instances_correct} of their targets correctly"
    )


def pair_rows(report: AuditReport) -> list[tuple[str, ...]]:
    """One row per attack and pair: the cells of :data:`PAIR_COLUMNS`."""
    classes = report.dataset.classes
    rows: list[tuple[str, ...]] = [
        (
            name.upper(),
            pair_cell(classes, pair.target_class, pair.poison_class),
            pair.source,
            rate_cell(pair.asr),
            rate_cell(pair.baseline),
        )
        for name, result in report.attacks.items()
        for pair in result.pairs
    ]
    return rows


def budget_rows(curve: BudgetCurve) -> list[tuple[str, ...]]:
    """One row per budget point, the delta sweep then the poisons sweep: the cells of
    :data:`BUDGET_COLUMNS`."""
    sweeps = (("delta", curve.delta_points), ("poisons", curve.poisons_points))
    return [
        (
            sweep,
            delta_cell(point.delta),
            str(point.poisons),
            rate_cell(point.model),
            "-" if point.reference is None else rate_cell(point.reference),
            percent(point.model_baseline.rate),
        )
        for sweep, points in sweeps
        for point in points
    ]


def budget_title(curve: BudgetCurve) -> str:
    return (
        f"budget curve ({curve.attack.upper()}): ASR as the attacker's l-inf budget delta and "
        "poisons per instance move"
    )


def headline_label(report: AuditReport) -> str:
    """What the headline ASR is taken over."""
    if any(r.asr_correct_targets is not None for r in report.attacks.values()):
        return "ASR among the targets the clean model classifies correctly"
    return "ASR over all instances"


COMPARISON_COLUMNS = (
    "attack",
    "model ASR",
    "95% CI",
    "reference ASR",
    "95% CI",
    "difference [95% CI]",
)


def comparison_rows(report: AuditReport) -> list[tuple[str, ...]]:
    """One row per attack compared with the reference: the cells of
    :data:`COMPARISON_COLUMNS` (each model's headline, model minus reference)."""
    rows: list[tuple[str, ...]] = []
    for name, comparison in report.comparison.items():
        model = rate_cell(comparison.model)
        result = report.attacks.get(name)
        label = name.upper()
        if name == UNION and report.union is not None:
            label = f"{UNION.upper()} ({'|'.join(a.upper() for a in report.union.attacks)})"
        if result is not None and result.asr_is_lower_bound:
            model += f" {LOWER_BOUND_MARK}"
        rows.append(
            (
                label,
                model,
                interval_cell(comparison.model.wilson95),
                rate_cell(comparison.reference),
                interval_cell(comparison.reference.wilson95),
                difference_cell(comparison.difference, comparison.difference95),
            )
        )
    return rows


def protocol_line(report: AuditReport) -> str:
    """'40 instances over pairs [[1, 2]], delta 0.0314, ...': how the numbers were measured."""
    config = report.config
    if report.pair_choices:
        sources = Counter(choice.source for choice in report.pair_choices)
        chosen = ", ".join(f"{count} {source}" for source, count in sources.items())
        pairs = f"{len(report.pair_choices)} pairs ({chosen})"
    else:
        pairs = f"pairs {config.get('pairs')}"
    return (
        f"{len(report.instances)} instances over {pairs}, delta "
        f"{config.get('delta', 0):.4f}, {config.get('iterations')} iterations, head "
        f"re-trained {config.get('retrain_epochs')} epochs ({report.head_init} head)"
    )


def sequential_line(report: AuditReport) -> str | None:
    """How a sequential audit ran (its rounds and looks, what stopped it, the crafting work it
    saved); None for an audit that crafted every instance in one go."""
    facts = report.sequential
    if facts is None:
        return None
    early = (
        f", instances whose poisons succeed stopped every {facts.early_stop_every} iterations"
        if facts.early_stop_every
        else ""
    )
    return (
        f"{facts.instances_run} of {facts.instances_planned} planned instances in "
        f"{facts.rounds_run} of {facts.rounds_planned} rounds, the verdict looked at after each "
        f"at {100 * facts.look_confidence:.4g}%{early}; {facts.stopped.rstrip('.')}; crafting work "
        f"{facts.crafting_work:,} of {facts.crafting_work_full:,} poison passes "
        f"({percent(facts.work_fraction, 0)})"
    )


def _table(columns: tuple[str, ...], rows: list[tuple[str, ...]], *, markdown: bool) -> list[str]:
    """A markdown table, or plain text in aligned columns."""
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(columns, *rows, strict=False)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [columns, *rows]
    ]


def render_asr_table(report: AuditReport, *, markdown: bool = False) -> str:
    """The report's summary: the model line, the reference, the ASR table with its notes
    (lower bounds, targets left out of the headline), the pairs and their ASR, the budget
    curve, the screen and the protocol.

    Plain text (aligned columns) for a terminal, or markdown for a card or a document. A /1 or
    /2 report, without the parts /3 added, renders as it always did.
    """
    model = report.model
    pre_acc = "?" if report.pre_acc is None else percent(report.pre_acc, 2)
    head = (
        f"model {model.path} ({model.arch}, defense {model.defense or '?'}), "
        f"Pre. Acc {pre_acc}; dataset {report.dataset.name}"
    )
    # Markdown needs a blank line after each paragraph and table; a terminal does not.
    gap = [""] if markdown else []
    lines = [head, *gap]
    reference = reference_line(report)
    if reference is not None:
        lines += [reference, *gap]
    lines += _table(asr_columns(report), asr_rows(report), markdown=markdown)
    lines += gap
    misclassified = misclassified_line(report)
    for note in [*reach_lines(report), *([misclassified] if misclassified else [])]:
        lines += [note, *gap]
    choices = pair_choices_line(report)
    if choices is not None:
        lines += [choices, *gap]
    pairs = pair_rows(report)
    if pairs:
        lines += ["ASR per pair:", *gap, *_table(PAIR_COLUMNS, pairs, markdown=markdown), *gap]
    if report.budget_curve is not None:
        curve = report.budget_curve
        lines += [budget_title(curve) + ":", *gap]
        lines += [*_table(BUDGET_COLUMNS, budget_rows(curve), markdown=markdown), *gap]
    lines.append(f"protocol: {protocol_line(report)}")
    sequential = sequential_line(report)
    if sequential is not None:
        lines.append(f"sequential: {sequential}")
    if report.screen is not None:
        lines.append(screen_line(report.screen))
    return "\n".join(lines)
