"""A report as pictures and one HTML page, torch-free (the API renders them).

:func:`asr_chart_svg` draws the headline ASR of every attack as a bar with its 95% Wilson
interval and the baseline rate as a marker, beside the undefended reference's bar where the
report has one; :func:`budget_chart_svg` draws the budget curve (ASR against delta and against
poisons per instance, model and reference); :func:`render_report_html` is one self-contained
page (inline CSS, the charts inline, the poison grids as ``data:`` URIs, no external
resources). Every number is written by the formatters of :mod:`core.report`, the one renderer
of a report's numbers.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from core.report import (
    BUDGET_COLUMNS,
    COMPARISON_COLUMNS,
    PAIR_COLUMNS,
    AttackResult,
    AuditReport,
    BudgetPoint,
    Rate,
    asr_columns,
    asr_rows,
    budget_rows,
    budget_title,
    comparison_rows,
    delta_cell,
    headline_label,
    interval_cell,
    misclassified_line,
    pair_choices_line,
    pair_rows,
    percent,
    protocol_line,
    reach_lines,
    reference_line,
    screen_line,
    sequential_line,
)
from core.verdict import BOUNDS, Check, Verdict, policy_source

# Chart geometry, in SVG user units: the plot spans PLOT_HEIGHT for 0-100%.
PLOT_HEIGHT = 300.0
PLOT_TOP = 48.0
PLOT_LEFT = 64.0
SLOT_WIDTH = 110.0  # one attack, one bar
PAIR_SLOT_WIDTH = 150.0  # one attack, the model's bar and the reference's
BAR_WIDTH = 56.0
PAIR_BAR_WIDTH = 44.0
BAR_GAP = 10.0  # between the model's bar and the reference's
BOTTOM = 64.0  # room for the attack names and the values under the bars
LEGEND_LINE = 18.0
RIGHT = 24.0
MIN_WIDTH = 400.0  # room for the title and the legend
MODEL_COLOR = "#4e79a7"
REFERENCE_COLOR = "#a0a0a0"
REFERENCE_LINE_COLOR = "#6f6f6f"
BASELINE_COLOR = "#e15759"


def _y(rate: float, top: float = PLOT_TOP, height: float = PLOT_HEIGHT) -> float:
    """The y coordinate of a rate in [0, 1] (clamped) on a plot from ``top`` of ``height``."""
    return round(top + height * (1 - min(max(rate, 0.0), 1.0)), 2)


def _asr_label(rate: Rate, lower_bound: bool) -> str:
    """The value written under a bar: '27.8%', '≥27.8%' where the ASR is a lower bound."""
    return ("≥" if lower_bound else "") + percent(rate.rate)


def _whisker(
    center: float,
    low: float,
    high: float,
    *,
    top: float,
    height: float,
    color: str = "black",
    cap: float = 6.0,
) -> list[str]:
    """A 95% interval: the vertical line (``class="interval"``) and its two caps."""
    y_low, y_high = _y(low, top, height), _y(high, top, height)
    stroke = f'stroke="{color}" stroke-width="1.5"'
    return [
        f'<line class="interval" x1="{center:g}" y1="{y_low:g}" x2="{center:g}" '
        f'y2="{y_high:g}" {stroke}/>',
        f'<line x1="{center - cap:g}" y1="{y_low:g}" x2="{center + cap:g}" y2="{y_low:g}" '
        f"{stroke}/>",
        f'<line x1="{center - cap:g}" y1="{y_high:g}" x2="{center + cap:g}" y2="{y_high:g}" '
        f"{stroke}/>",
    ]


def _bar(
    css_class: str,
    center: float,
    width: float,
    rate: Rate,
    baseline: Rate,
    fill: str,
) -> list[str]:
    """One bar as high as ``rate``, its whisker and its baseline marker."""
    base = PLOT_TOP + PLOT_HEIGHT
    left = center - width / 2
    bar_height = round(PLOT_HEIGHT * min(max(rate.rate, 0.0), 1.0), 2)
    baseline_y = _y(baseline.rate)
    return [
        f'<rect class="{css_class}" x="{left:g}" y="{base - bar_height:g}" width="{width:g}" '
        f'height="{bar_height:g}" fill="{fill}"/>',
        *_whisker(center, *rate.wilson95, top=PLOT_TOP, height=PLOT_HEIGHT),
        f'<line class="baseline" x1="{left - 4:g}" y1="{baseline_y:g}" '
        f'x2="{left + width + 4:g}" y2="{baseline_y:g}" stroke="{BASELINE_COLOR}" '
        'stroke-width="3" stroke-dasharray="6 3"/>',
    ]


def _reference_result(report: AuditReport, attack: str) -> AttackResult | None:
    if report.reference is None:
        return None
    return report.reference.attacks.get(attack)


def _legend(x: float, y: float, entries: Sequence[tuple[str, str]]) -> list[str]:
    """Legend rows from ``y`` down: (swatch SVG at the origin, text) each."""
    parts = []
    for row, (swatch, text) in enumerate(entries):
        top = y + LEGEND_LINE * row
        parts.append(
            f'<g transform="translate({x:g} {top:g})">{swatch}</g>'
            f'<text x="{x + 22:g}" y="{top + 4:g}">{escape(text)}</text>'
        )
    return parts


def _box(color: str) -> str:
    return f'<rect x="0" y="-5" width="14" height="10" fill="{color}"/>'


def _dash(color: str, dash: str = "6 3", width: float = 3) -> str:
    return (
        f'<line x1="-2" y1="0" x2="16" y2="0" stroke="{color}" stroke-width="{width:g}" '
        f'stroke-dasharray="{dash}"/>'
    )


WHISKER_SWATCH = (
    '<line x1="7" y1="-6" x2="7" y2="6" stroke="black" stroke-width="1.5"/>'
    '<line x1="3" y1="-6" x2="11" y2="-6" stroke="black" stroke-width="1.5"/>'
    '<line x1="3" y1="6" x2="11" y2="6" stroke="black" stroke-width="1.5"/>'
)


def asr_chart_svg(report: AuditReport) -> str:
    """An SVG bar chart: per attack a ``rect class="bar"`` as high as its headline ASR (times
    PLOT_HEIGHT) and, where the report has a reference, a ``rect class="ref-bar"`` for the
    reference's beside it; each with its 95% whisker and its baseline marker."""
    attacks = list(report.attacks.items())
    with_reference = any(_reference_result(report, name) is not None for name, _ in attacks)
    slot = PAIR_SLOT_WIDTH if with_reference else SLOT_WIDTH
    width = max(PLOT_LEFT + slot * max(len(attacks), 1) + RIGHT, MIN_WIDTH)
    legend: list[tuple[str, str]] = [(_box(MODEL_COLOR), "model audited")]
    if with_reference:
        legend.append((_box(REFERENCE_COLOR), "undefended reference (same instances)"))
    legend += [
        (WHISKER_SWATCH, "whisker: 95% Wilson interval"),
        (_dash(BASELINE_COLOR), "baseline (unperturbed bases)"),
    ]
    base = PLOT_TOP + PLOT_HEIGHT
    legend_y = base + BOTTOM
    height = legend_y + LEGEND_LINE * len(legend)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{height:g}" '
        f'viewBox="0 0 {width:g} {height:g}" role="img" aria-labelledby="asr-title" '
        'font-family="sans-serif" font-size="12">',
        '<title id="asr-title">Attack success rate per attack'
        + (" for the model and the undefended reference" if with_reference else "")
        + ", with 95% Wilson intervals and the baseline rate</title>",
        f'<rect x="0" y="0" width="{width:g}" height="{height:g}" fill="white"/>',
        f'<text x="{PLOT_LEFT:g}" y="20" font-size="14" font-weight="bold">'
        "Attack success rate (ASR)</text>",
        f'<text x="{PLOT_LEFT:g}" y="36" fill="#555">{escape(headline_label(report))}</text>',
    ]
    parts += _axes(PLOT_LEFT, PLOT_TOP, width - RIGHT - PLOT_LEFT, PLOT_HEIGHT)
    for index, (name, result) in enumerate(attacks):
        label = escape(name.upper())
        center = PLOT_LEFT + slot * (index + 0.5)
        reference = _reference_result(report, name)
        headline, baseline = result.headline, result.headline_baseline
        tooltip = (
            f"{label}: ASR {escape(percent(headline.rate))}, 95% CI "
            f"{escape(interval_cell(headline.wilson95))}, baseline "
            f"{escape(percent(baseline.rate))}"
        )
        if reference is None:
            model_center, bar_width = center, BAR_WIDTH
        else:
            bar_width = PAIR_BAR_WIDTH
            model_center = center - (PAIR_BAR_WIDTH + BAR_GAP) / 2
            tooltip += (
                f"; reference ASR {escape(percent(reference.headline.rate))}, 95% CI "
                f"{escape(interval_cell(reference.headline.wilson95))}"
            )
        parts += [
            f'<g class="attack" data-attack="{escape(name)}">',
            f"<title>{tooltip}</title>",
            *_bar("bar", model_center, bar_width, headline, baseline, MODEL_COLOR),
            f'<text x="{model_center:g}" y="{base + 16:g}" text-anchor="middle">'
            f"{escape(_asr_label(headline, result.asr_is_lower_bound))}</text>",
        ]
        if reference is not None:
            reference_center = center + (PAIR_BAR_WIDTH + BAR_GAP) / 2
            parts += [
                *_bar(
                    "ref-bar",
                    reference_center,
                    bar_width,
                    reference.headline,
                    reference.headline_baseline,
                    REFERENCE_COLOR,
                ),
                f'<text x="{reference_center:g}" y="{base + 16:g}" text-anchor="middle" '
                f'fill="#555">{escape(percent(reference.headline.rate))}</text>',
            ]
        parts += [
            f'<text x="{center:g}" y="{base + 36:g}" text-anchor="middle" '
            f'font-weight="bold">{label}</text>',
            "</g>",
        ]
    parts += _legend(PLOT_LEFT, legend_y, legend)
    parts.append("</svg>")
    return "\n".join(parts)


def _axes(left: float, top: float, width: float, height: float) -> list[str]:
    """The 0-100% grid and the y axis of a plot, the x axis at its base."""
    parts = []
    for tick in (0, 25, 50, 75, 100):
        y = _y(tick / 100, top, height)
        parts.append(
            f'<line class="grid" x1="{left:g}" y1="{y:g}" x2="{left + width:g}" y2="{y:g}" '
            'stroke="#dddddd"/>'
            f'<text x="{left - 8:g}" y="{y + 4:g}" text-anchor="end">{tick}%</text>'
        )
    middle = top + height / 2
    parts.append(
        f'<line x1="{left:g}" y1="{top:g}" x2="{left:g}" y2="{top + height:g}" stroke="black"/>'
        f'<line x1="{left:g}" y1="{top + height:g}" x2="{left + width:g}" y2="{top + height:g}" '
        'stroke="black"/>'
        f'<text x="{left - 44:g}" y="{middle:g}" text-anchor="middle" '
        f'transform="rotate(-90 {left - 44:g} {middle:g})">ASR</text>'
    )
    return parts


# Budget chart geometry: two panels side by side.
PANEL_WIDTH = 300.0
PANEL_HEIGHT = 200.0
PANEL_LEFT = 64.0  # room for the y tick labels and the axis name
PANEL_GAP = 40.0
PANEL_TOP = 68.0
PANEL_BOTTOM = 52.0  # x tick labels and the axis name
DODGE = 6.0  # the reference's points sit this far right of the model's at the same budget
MIN_TICK_SPACING = 22.0  # closer x tick labels than this would overlap: the later one is left out


@dataclass(frozen=True)
class _Panel:
    title: str
    axis: str
    points: list[BudgetPoint]
    x_values: list[float]
    x_labels: list[str]


def _budget_panels(report: AuditReport) -> list[_Panel]:
    curve = report.budget_curve
    assert curve is not None
    delta_points, poisons_points = curve.delta_points, curve.poisons_points
    at_poisons = f"{delta_points[0].poisons} poisons per instance" if delta_points else ""
    at_delta = f"delta {delta_cell(poisons_points[0].delta)}" if poisons_points else ""
    return [
        _Panel(
            title=f"ASR vs delta ({at_poisons})" if at_poisons else "ASR vs delta",
            axis="l-inf budget delta (/255)",
            points=delta_points,
            x_values=[255 * p.delta for p in delta_points],
            x_labels=[f"{255 * p.delta:.4g}" for p in delta_points],
        ),
        _Panel(
            title=f"ASR vs poisons ({at_delta})" if at_delta else "ASR vs poisons",
            axis="poisons per instance",
            points=poisons_points,
            x_values=[float(p.poisons) for p in poisons_points],
            x_labels=[str(p.poisons) for p in poisons_points],
        ),
    ]


def _series(
    css_class: str,
    xs: list[float],
    rates: list[Rate],
    color: str,
    dash: str | None,
) -> list[str]:
    """A line through the points (``class=css_class``), a dot and a whisker at each."""
    ys = [_y(r.rate, PANEL_TOP, PANEL_HEIGHT) for r in rates]
    stroke = f' stroke-dasharray="{dash}"' if dash else ""
    points = " ".join(f"{x:g},{y:g}" for x, y in zip(xs, ys, strict=True))
    parts = [
        f'<polyline class="{css_class}" points="{points}" fill="none" stroke="{color}" '
        f'stroke-width="2"{stroke}/>'
    ]
    for x, y, rate in zip(xs, ys, rates, strict=True):
        parts += _whisker(
            x, *rate.wilson95, top=PANEL_TOP, height=PANEL_HEIGHT, color=color, cap=4.0
        )
        parts.append(
            f'<circle class="{css_class}-point" cx="{x:g}" cy="{y:g}" r="4" fill="{color}">'
            f"<title>{escape(percent(rate.rate))} ({rate.successes}/{rate.trials}), 95% CI "
            f"{escape(interval_cell(rate.wilson95))}</title></circle>"
        )
    return parts


def _budget_panel(panel: _Panel, left: float) -> list[str]:
    parts = [
        f'<g class="panel" data-sweep="{escape(panel.axis)}">',
        f'<text x="{left:g}" y="{PANEL_TOP - 12:g}" font-weight="bold">'
        f"{escape(panel.title)}</text>",
        *_axes(left, PANEL_TOP, PANEL_WIDTH, PANEL_HEIGHT),
    ]
    base = PANEL_TOP + PANEL_HEIGHT
    parts.append(
        f'<text x="{left + PANEL_WIDTH / 2:g}" y="{base + 40:g}" text-anchor="middle">'
        f"{escape(panel.axis)}</text>"
    )
    if not panel.points:
        parts += [
            f'<text x="{left + PANEL_WIDTH / 2:g}" y="{PANEL_TOP + PANEL_HEIGHT / 2:g}" '
            'text-anchor="middle" fill="#555">no points in this sweep</text>',
            "</g>",
        ]
        return parts
    # x from 0 to a little past the largest budget, so that distances between budgets read
    # true and the last whisker stays inside the plot.
    span = max(panel.x_values) * 1.08 or 1.0
    xs = [round(left + PANEL_WIDTH * value / span, 2) for value in panel.x_values]
    last_label = -MIN_TICK_SPACING
    for x, label in sorted(zip(xs, panel.x_labels, strict=True)):
        parts.append(
            f'<line x1="{x:g}" y1="{base:g}" x2="{x:g}" y2="{base + 5:g}" stroke="black"/>'
        )
        if x - last_label >= MIN_TICK_SPACING:
            parts.append(
                f'<text x="{x:g}" y="{base + 19:g}" text-anchor="middle">{escape(label)}</text>'
            )
            last_label = x
    references = [p.reference for p in panel.points]
    if all(r is not None for r in references):
        parts += _series(
            "ref-line",
            [x + DODGE for x in xs],
            [r for r in references if r is not None],
            REFERENCE_LINE_COLOR,
            "5 3",
        )
    parts += _series("model-line", xs, [p.model for p in panel.points], MODEL_COLOR, None)
    parts.append("</g>")
    return parts


def budget_chart_svg(report: AuditReport) -> str:
    """The budget curve as SVG: two panels (ASR against delta, ASR against poisons per
    instance), each with the model's line (``polyline class="model-line"``) and, where the
    report has one, the reference's (``class="ref-line"``), 95% whiskers at every point.

    Raises ValueError for a report without a budget curve.
    """
    curve = report.budget_curve
    if curve is None:
        raise ValueError("the report has no budget curve")
    panels = _budget_panels(report)
    with_reference = any(p.reference is not None for panel in panels for p in panel.points)
    width = PANEL_LEFT + 2 * PANEL_WIDTH + PANEL_GAP + PANEL_LEFT + RIGHT
    legend: list[tuple[str, str]] = [
        (_dash(MODEL_COLOR, "none", 2), f"model: {curve.attack.upper()} ASR")
    ]
    if with_reference:
        legend.append((_dash(REFERENCE_LINE_COLOR, "5 3", 2), "undefended reference"))
    legend.append((WHISKER_SWATCH, "whisker: 95% Wilson interval (in the line's color)"))
    legend_y = PANEL_TOP + PANEL_HEIGHT + PANEL_BOTTOM + 12
    height = legend_y + LEGEND_LINE * len(legend)
    title = budget_title(curve)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{height:g}" '
        f'viewBox="0 0 {width:g} {height:g}" role="img" aria-labelledby="budget-title" '
        'font-family="sans-serif" font-size="12">',
        f'<title id="budget-title">{escape(title)}</title>',
        f'<rect x="0" y="0" width="{width:g}" height="{height:g}" fill="white"/>',
        f'<text x="{PANEL_LEFT:g}" y="20" font-size="14" font-weight="bold">'
        f"{escape(curve.attack.upper())} budget curve</text>",
        f'<text x="{PANEL_LEFT:g}" y="36" fill="#555">{escape(headline_label(report))}</text>',
    ]
    for index, panel in enumerate(panels):
        left = PANEL_LEFT + index * (PANEL_WIDTH + PANEL_GAP + PANEL_LEFT)
        parts += _budget_panel(panel, left)
    parts += _legend(PANEL_LEFT, legend_y, legend)
    parts.append("</svg>")
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .3em 1.2em; }
dl.facts dt { font-weight: bold; } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #bbb; padding: .3em .8em; text-align: left; }
th { background: #f0f0f0; }
figure { margin: 1em 0; } figcaption { font-weight: bold; margin-bottom: .4em; }
img.grid { max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
.chart { overflow-x: auto; }
.verdict { border-left: .5em solid #999; padding: .4em 1em; background: #f7f7f7; }
.verdict.pass { border-color: #2e7d32; } .verdict.fail { border-color: #c62828; }
.verdict.inconclusive { border-color: #e0a000; }
.verdict .outcome { font-size: 1.3em; font-weight: bold; text-transform: uppercase; }
ul.notes li { margin: .2em 0; }
""".strip()


def _facts(items: list[tuple[str, str]]) -> str:
    rows = "".join(f"<dt>{escape(key)}</dt><dd>{escape(value)}</dd>" for key, value in items)
    return f'<dl class="facts">{rows}</dl>'


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    header = "".join(f"<th>{escape(column)}</th>" for column in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _bound_cell(check: Check, value: float | None) -> str:
    if value is None:
        return "unbounded"
    if check.name == "max_asr_relative_to_reference":
        return f"{value:.2f}x"
    return percent(value)


CHECK_COLUMNS = ("attack", "check", "threshold", "observed", "bounds", "outcome")


def _verdict_section(verdict: Verdict) -> list[str]:
    rows = [
        (
            check.attack.upper(),
            check.name,
            _bound_cell(check, check.threshold),
            _bound_cell(check, check.observed),
            f"[{_bound_cell(check, check.lower)}, {_bound_cell(check, check.upper)}]",
            check.outcome + (f" ({check.note})" if check.note else ""),
        )
        for check in verdict.checks
    ]
    policy = policy_source(verdict) or "policy given with the audit"
    return [
        "<h2>Verdict</h2>",
        f'<div class="verdict {escape(verdict.outcome)}">'
        f'<p class="outcome">{escape(verdict.outcome)}</p>'
        f"<p>{escape(verdict.reason)}</p>"
        f"<p>Decided at {escape(f'{100 * verdict.confidence:g}')}% confidence by "
        f"{escape(BOUNDS)}; "
        f"{escape(policy)}.</p></div>",
        _table(CHECK_COLUMNS, rows) if rows else "",
    ]


def render_report_html(
    report: AuditReport, pictures: Mapping[str, bytes], *, title: str = "Bulwark audit report"
) -> str:
    """The report as one self-contained HTML page; ``pictures`` maps an attack to its poison
    grid's PNG bytes (inlined as ``data:`` URIs, never decoded).

    Sections: the verdict (where a policy gave one), the facts, the headline comparison with
    the reference (or why there is none) and the ASR chart, the ASR table and its notes (lower
    bounds, targets left out of the headline), the pairs, the budget curve, the poisons.
    """
    model, dataset = report.model, report.dataset
    pre_acc = "?" if report.pre_acc is None else percent(report.pre_acc, 2)
    if report.pre_acc_source is not None:
        pre_acc += f" ({report.pre_acc_source})"
    sequential = sequential_line(report)
    model_facts = [
        ("model", model.path),
        ("architecture", model.arch),
        ("defense", model.defense or "?"),
        ("trained on", model.trained_on or "?"),
        ("weights SHA-256", model.weights_sha256 or "?"),
        ("Pre. Acc", pre_acc),
        ("dataset", dataset.name),
        ("classes", ", ".join(dataset.classes)),
        ("protocol", protocol_line(report)),
        *([("sequential", sequential)] if sequential is not None else []),
        ("screen", screen_line(report.screen) if report.screen is not None else "not run"),
        ("created", report.created_at),
    ]
    sections: list[str] = []
    if report.verdict is not None:
        sections += _verdict_section(report.verdict)
    sections.append(_facts(model_facts))

    chart = f'<div class="chart">{asr_chart_svg(report)}</div>'
    reference = reference_line(report)
    if reference is not None:  # a /3 report: the headline is model vs reference
        heading = "Headline: model vs undefended reference" if report.reference else "Headline"
        sections += [
            f"<h2>{heading}</h2>",
            f'<p class="reference">{escape(reference)}</p>',
        ]
        comparisons = comparison_rows(report)
        if comparisons:
            sections.append(_table(COMPARISON_COLUMNS, comparisons))
        sections.append(chart)
    sections += [
        "<h2>Attack success rate</h2>",
        _table(asr_columns(report), asr_rows(report)),
    ]
    if reference is None:
        sections.append(chart)
    misclassified = misclassified_line(report)
    notes = [*reach_lines(report), *([misclassified] if misclassified else [])]
    if notes:
        items = "".join(f"<li>{escape(note)}</li>" for note in notes)
        sections.append(f'<ul class="notes">{items}</ul>')

    pairs = pair_rows(report)
    choices = pair_choices_line(report)
    if pairs or choices:
        sections.append("<h2>Pairs</h2>")
        if choices:
            sections.append(f'<p class="pairs">{escape(choices)}</p>')
        if pairs:
            sections.append(_table(PAIR_COLUMNS, pairs))

    if report.budget_curve is not None:
        sections += [
            "<h2>Budget curve</h2>",
            f"<p>{escape(budget_title(report.budget_curve))}</p>",
            f'<div class="chart">{budget_chart_svg(report)}</div>',
            _table(BUDGET_COLUMNS, budget_rows(report.budget_curve)),
        ]

    figures = []
    for name in report.attacks:
        png = pictures.get(name)
        caption = f"{name.upper()} poisons: base | poison ... | target, one row per instance"
        if png is None:
            figures.append(
                f"<figure><figcaption>{escape(caption)}</figcaption>"
                "<p>no poison picture stored for this attack</p></figure>"
            )
            continue
        data = base64.b64encode(png).decode("ascii")
        figures.append(
            f"<figure><figcaption>{escape(caption)}</figcaption>"
            f'<img class="grid" src="data:image/png;base64,{data}" '
            f'alt="{escape(name.upper())} poison grid"></figure>'
        )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}: {escape(model.path)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{escape(title)}</h1>",
            *sections,
            "<h2>Poisons</h2>",
            *figures,
            "</body></html>",
        ]
    )
