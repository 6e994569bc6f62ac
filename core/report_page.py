"""A report as pictures and one HTML page, torch-free (the API renders them).

:func:`asr_chart_svg` draws the ASR of every attack as a bar with its 95% Wilson interval and
the baseline rate as a marker; :func:`render_report_html` is one self-contained page (inline
CSS, the chart inline, the poison grids as ``data:`` URIs, no external resources). Every number
is written by the formatters of :mod:`core.report`, the one renderer of a report's numbers.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from html import escape

from core.report import (
    ASR_COLUMNS,
    AuditReport,
    asr_rows,
    interval_cell,
    percent,
    protocol_line,
    screen_line,
)

# Chart geometry, in SVG user units: the plot spans PLOT_HEIGHT for 0-100%.
PLOT_HEIGHT = 300.0
PLOT_TOP = 40.0
PLOT_LEFT = 64.0
SLOT_WIDTH = 110.0
BAR_WIDTH = 56.0
BOTTOM = 90.0
RIGHT = 24.0
MIN_WIDTH = 320.0  # room for the legend


def _y(rate: float) -> float:
    """The y coordinate of a rate in [0, 1] (clamped)."""
    return round(PLOT_TOP + PLOT_HEIGHT * (1 - min(max(rate, 0.0), 1.0)), 2)


def asr_chart_svg(report: AuditReport) -> str:
    """An SVG bar chart: one ``rect class="bar"`` per attack, height ``asr * PLOT_HEIGHT``."""
    attacks = list(report.attacks.values())
    width = max(PLOT_LEFT + SLOT_WIDTH * max(len(attacks), 1) + RIGHT, MIN_WIDTH)
    height = PLOT_TOP + PLOT_HEIGHT + BOTTOM
    base = PLOT_TOP + PLOT_HEIGHT
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{height:g}" '
        f'viewBox="0 0 {width:g} {height:g}" role="img" aria-labelledby="asr-title" '
        'font-family="sans-serif" font-size="12">',
        '<title id="asr-title">Attack success rate per attack, with 95% Wilson intervals '
        "and the baseline rate</title>",
        f'<rect x="0" y="0" width="{width:g}" height="{height:g}" fill="white"/>',
        f'<text x="{PLOT_LEFT:g}" y="20" font-size="14" font-weight="bold">'
        "Attack success rate (ASR)</text>",
    ]
    for tick in (0, 25, 50, 75, 100):
        y = _y(tick / 100)
        parts.append(
            f'<line class="grid" x1="{PLOT_LEFT:g}" y1="{y:g}" x2="{width - RIGHT:g}" y2="{y:g}" '
            'stroke="#dddddd"/>'
            f'<text x="{PLOT_LEFT - 8:g}" y="{y + 4:g}" text-anchor="end">{tick}%</text>'
        )
    parts.append(
        f'<line x1="{PLOT_LEFT:g}" y1="{PLOT_TOP:g}" x2="{PLOT_LEFT:g}" y2="{base:g}" '
        'stroke="black"/>'
        f'<line x1="{PLOT_LEFT:g}" y1="{base:g}" x2="{width - RIGHT:g}" y2="{base:g}" '
        'stroke="black"/>'
        f'<text x="16" y="{PLOT_TOP + PLOT_HEIGHT / 2:g}" text-anchor="middle" '
        f'transform="rotate(-90 16 {PLOT_TOP + PLOT_HEIGHT / 2:g})">ASR</text>'
    )
    for index, result in enumerate(attacks):
        name = escape(result.attack.upper())
        center = PLOT_LEFT + SLOT_WIDTH * (index + 0.5)
        left = center - BAR_WIDTH / 2
        bar_height = round(PLOT_HEIGHT * min(max(result.asr, 0.0), 1.0), 2)
        low, high = result.asr_wilson95
        baseline = _y(result.baseline.rate)
        parts += [
            f'<g class="attack" data-attack="{escape(result.attack)}">',
            f"<title>{name}: ASR {escape(percent(result.asr))}, 95% CI "
            f"{escape(interval_cell(result.asr_wilson95))}, baseline "
            f"{escape(percent(result.baseline.rate))}</title>",
            f'<rect class="bar" x="{left:g}" y="{base - bar_height:g}" width="{BAR_WIDTH:g}" '
            f'height="{bar_height:g}" fill="#4e79a7"/>',
            f'<line class="interval" x1="{center:g}" y1="{_y(low):g}" x2="{center:g}" '
            f'y2="{_y(high):g}" stroke="black" stroke-width="1.5"/>',
            f'<line x1="{center - 8:g}" y1="{_y(low):g}" x2="{center + 8:g}" y2="{_y(low):g}" '
            'stroke="black" stroke-width="1.5"/>',
            f'<line x1="{center - 8:g}" y1="{_y(high):g}" x2="{center + 8:g}" '
            f'y2="{_y(high):g}" stroke="black" stroke-width="1.5"/>',
            f'<line class="baseline" x1="{left - 6:g}" y1="{baseline:g}" '
            f'x2="{left + BAR_WIDTH + 6:g}" y2="{baseline:g}" stroke="#e15759" '
            'stroke-width="3" stroke-dasharray="6 3"/>',
            f'<text x="{center:g}" y="{base + 18:g}" text-anchor="middle" '
            f'font-weight="bold">{name}</text>',
            f'<text x="{center:g}" y="{base + 34:g}" text-anchor="middle">'
            f"{escape(percent(result.asr))}</text>",
            "</g>",
        ]
    legend_y = base + 56
    parts += [
        f'<rect x="{PLOT_LEFT:g}" y="{legend_y - 9:g}" width="12" height="10" fill="#4e79a7"/>',
        f'<text x="{PLOT_LEFT + 16:g}" y="{legend_y:g}">ASR, whisker: 95% Wilson interval</text>',
        f'<line x1="{PLOT_LEFT - 2:g}" y1="{legend_y + 14:g}" x2="{PLOT_LEFT + 14:g}" '
        f'y2="{legend_y + 14:g}" stroke="#e15759" stroke-width="3" stroke-dasharray="6 3"/>',
        f'<text x="{PLOT_LEFT + 16:g}" y="{legend_y + 18:g}">baseline (unperturbed bases)</text>',
        "</svg>",
    ]
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
""".strip()


def _facts(items: list[tuple[str, str]]) -> str:
    rows = "".join(f"<dt>{escape(key)}</dt><dd>{escape(value)}</dd>" for key, value in items)
    return f'<dl class="facts">{rows}</dl>'


def render_report_html(
    report: AuditReport, pictures: Mapping[str, bytes], *, title: str = "Bulwark audit report"
) -> str:
    """The report as one self-contained HTML page; ``pictures`` maps an attack to its poison
    grid's PNG bytes (inlined as ``data:`` URIs, never decoded)."""
    model, dataset = report.model, report.dataset
    pre_acc = "?" if report.pre_acc is None else percent(report.pre_acc, 2)
    if report.pre_acc_source is not None:
        pre_acc += f" ({report.pre_acc_source})"
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
        ("screen", screen_line(report.screen) if report.screen is not None else "not run"),
        ("created", report.created_at),
    ]
    if report.verdict is not None:
        model_facts.append(("verdict", f"{report.verdict.outcome}: {report.verdict.reason}"))
    header = "".join(f"<th>{escape(column)}</th>" for column in ASR_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>"
        for row in asr_rows(report)
    )
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
            _facts(model_facts),
            "<h2>Attack success rate</h2>",
            f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>",
            f'<div class="chart">{asr_chart_svg(report)}</div>',
            "<h2>Poisons</h2>",
            *figures,
            "</body></html>",
        ]
    )
