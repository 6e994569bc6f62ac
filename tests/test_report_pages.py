"""The report's pictures and HTML page: the poison grid (Pillow), the ASR chart (SVG) and the
page, rendered by a real headless browser where Chromium is installed."""

from __future__ import annotations

import io
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from report_fixtures import CLASSES, full_report, legacy_report

from catalog.policy import DEFAULT_POLICY
from core.pictures import MIN_TILE, poison_grid_png
from core.report import AuditReport, percent
from core.report_page import (
    MODEL_COLOR,
    PANEL_HEIGHT,
    PANEL_TOP,
    PLOT_HEIGHT,
    asr_chart_svg,
    budget_chart_svg,
    render_report_html,
)

SVG = "{http://www.w3.org/2000/svg}"


def attack(name: str, successes: int, baseline: float) -> dict[str, Any]:
    mean_std = {"mean": 0.93, "std": 0.01}
    return {
        "attack": name,
        "poisons_per_instance": 1,
        "instances": 4,
        "successes": successes,
        "asr": successes / 4,
        "asr_wilson95": [max(0.0, successes / 4 - 0.3), min(1.0, successes / 4 + 0.3)],
        "baseline": {"successes": 0, "rate": baseline, "wilson95": [0.0, 0.49], "re_acc": mean_std},
        "re_acc": mean_std,
        "feature_distance": {"mean": 1.0, "std": 0.0},
        "relative_feature_distance": {"mean": 0.1, "std": 0.0},
        "max_linf": 0.03,
        "seconds": {"craft": 1.0},
        "rows": [],
    }


def sample_report() -> AuditReport:
    return AuditReport.model_validate(
        {
            "created_at": "2026-01-02T03:04:05+00:00",
            "model": {
                "path": "/v1/models/<m&1>",
                "arch": "convnet",
                "feature_dim": 128,
                "num_classes": 10,
                "defense": "none",
                "trained_on": "digits",
                "weights_sha256": "0" * 64,
            },
            "dataset": {
                "name": "digits",
                "classes": [str(c) for c in range(10)],
                "split": {"train": 1437, "test": 360},
                "retrain_images": 200,
                "pool_images": 1000,
                "eval_images": 360,
            },
            "pre_acc": 0.97,
            "pre_acc_source": "measured",
            "head_init": "pretrained",
            "config": {"pairs": [[1, 2]], "delta": 8 / 255, "iterations": 10},
            "seed": 0,
            "device": "cpu",
            "precision": "fp32",
            "instances": [],
            "attacks": {"fc": attack("fc", 1, 0.0), "cp": attack("cp", 3, 0.25)},
            "screen": None,
            "timings": {"total": 2.0},
            "versions": {},
        }
    )


def sample_grid(size: int = 8, channels: int = 1, value: int | None = None) -> bytes:
    generator = np.random.default_rng(0)
    shape = (channels, size, size)
    rows = [
        [
            np.full(shape, value, dtype=np.uint8)
            if value is not None
            else generator.integers(0, 256, shape, dtype=np.uint8)
            for _ in range(3)
        ]
        for _ in range(2)
    ]
    return poison_grid_png(
        rows,
        column_labels=["base 1", "poison 1", "target"],
        row_labels=["1 -> 2, success", "1 -> 2, failed"],
        row_success=[True, False],
    )


def test_the_chart_is_svg_with_one_bar_per_attack_as_high_as_its_asr() -> None:
    report = sample_report()
    root = ElementTree.fromstring(asr_chart_svg(report))
    assert root.tag == f"{SVG}svg"
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert len(bars) == len(report.attacks) == 2
    groups = [g for g in root.iter(f"{SVG}g") if g.get("class") == "attack"]
    assert [g.get("data-attack") for g in groups] == list(report.attacks)
    for group, bar in zip(groups, bars, strict=True):
        result = report.attacks[group.get("data-attack") or ""]
        assert float(bar.get("height") or "nan") == pytest.approx(result.asr * PLOT_HEIGHT)
        assert [line for line in group if line.get("class") == "baseline"]
        assert [line for line in group if line.get("class") == "interval"]
    text = "".join(root.itertext())
    assert "FC" in text and "CP" in text and "100%" in text and percent(0.75) in text


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (28, 1), (32, 3)])
def test_the_poison_grid_is_upscaled_and_labelled(size: int, channels: int) -> None:
    # Black tiles: each is a dark square; the labels are the only other ink.
    dark = np.asarray(Image.open(io.BytesIO(sample_grid(size, channels, 0))).convert("L")) < 128
    tile_rows = np.flatnonzero(dark.all(axis=1) | (dark.sum(axis=1) >= 3 * MIN_TILE))
    first_row = tile_rows[0]
    columns = np.flatnonzero(dark[first_row + 1])
    first_col = columns[0]
    run = np.flatnonzero(~dark[first_row + 1, first_col:])[0]  # the first tile's width
    assert run >= MIN_TILE and run % size == 0
    height = np.flatnonzero(~dark[first_row:, first_col + 1])[0]
    assert height == run
    assert dark[:first_row].any(), "no column labels above the tiles"
    assert dark[first_row:, : first_col - 1].any(), "no row labels left of the tiles"


def test_the_page_is_escaped_self_contained_and_inlines_the_pictures() -> None:
    report = sample_report()
    page = render_report_html(report, {"fc": sample_grid()})
    assert "<m&1>" not in page and "&lt;m&amp;1&gt;" in page
    assert "data:image/png;base64," in page and "<svg" in page
    assert "no poison picture stored" in page  # cp has none
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and "<link" not in page and "<script" not in page
    assert "97.00%" in page and "25.0% (1/4)" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_a_headless_browser_renders_the_page(tmp_path: Path) -> None:
    # The full /3 report: verdict, reference, pairs, notes, both charts and the poison grids.
    page = tmp_path / "report.html"
    page.write_text(
        render_report_html(full_report(), {"fc": sample_grid(28), "bp": sample_grid(28)})
    )
    shot = tmp_path / "out.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert shot.is_file()
    image = Image.open(shot).convert("RGB")
    pixels = np.asarray(image.convert("L"))
    assert pixels.shape == (2400, 1200)
    assert (pixels < 200).mean() > 0.01, "the screenshot is blank"
    # The charts were drawn: the model's bars and lines are the only pixels of their color.
    rgb = np.asarray(image).astype(int)
    model = np.array([int(MODEL_COLOR[i : i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(rgb - model).sum(axis=2) < 12).sum() > 2000, "no chart in the screenshot"


def svg_of(text: str) -> ElementTree.Element:
    root = ElementTree.fromstring(text)
    assert root.tag == f"{SVG}svg"
    return root


def by_class(root: ElementTree.Element, tag: str, css_class: str) -> list[ElementTree.Element]:
    return [e for e in root.iter(f"{SVG}{tag}") if e.get("class") == css_class]


def test_the_chart_puts_the_reference_bar_beside_each_attack() -> None:
    report = full_report()
    root = svg_of(asr_chart_svg(report))
    assert report.reference is not None
    groups = [g for g in root.iter(f"{SVG}g") if g.get("class") == "attack"]
    assert [g.get("data-attack") for g in groups] == ["fc", "bp"]
    for group in groups:
        name = group.get("data-attack") or ""
        (bar,) = by_class(group, "rect", "bar")
        (reference_bar,) = by_class(group, "rect", "ref-bar")
        # Each bar is as high as its headline: the model's and the reference's.
        headline = report.attacks[name].headline.rate
        reference = report.reference.attacks[name].headline.rate
        assert float(bar.get("height") or "nan") == pytest.approx(headline * PLOT_HEIGHT, abs=0.01)
        assert float(reference_bar.get("height") or "nan") == pytest.approx(
            reference * PLOT_HEIGHT, abs=0.01
        )
        assert float(bar.get("x") or 0) < float(reference_bar.get("x") or 0)
        assert bar.get("fill") != reference_bar.get("fill")
        assert len(by_class(group, "line", "interval")) == 2
        assert len(by_class(group, "line", "baseline")) == 2
    text = "".join(root.itertext())
    # BP's ASR is a lower bound (3 instances unreached); the legend names both bars.
    assert "≥27.8%" in text and "11.1%" in text and "59.5%" in text
    assert "undefended reference" in text and "95% Wilson interval" in text
    assert "among the targets the clean model classifies correctly" in text


def polyline_points(line: ElementTree.Element) -> list[tuple[float, float]]:
    pairs = (point.split(",") for point in (line.get("points") or "").split())
    return [(float(x), float(y)) for x, y in pairs]


def test_the_budget_chart_has_two_panels_with_model_and_reference_lines() -> None:
    report = full_report()
    curve = report.budget_curve
    assert curve is not None
    root = svg_of(budget_chart_svg(report))
    panels = [g for g in root.iter(f"{SVG}g") if g.get("class") == "panel"]
    assert len(panels) == 2
    for panel, points in zip(panels, (curve.delta_points, curve.poisons_points), strict=True):
        (model,) = by_class(panel, "polyline", "model-line")
        (reference,) = by_class(panel, "polyline", "ref-line")
        for line, rates in (
            (model, [p.model for p in points]),
            (reference, [p.reference for p in points]),
        ):
            xy = polyline_points(line)
            assert len(xy) == len(points) == 4
            # x grows with the budget; y is the rate on the panel's 0-100% scale.
            assert [x for x, _ in xy] == sorted(x for x, _ in xy)
            for (_, y), rate in zip(xy, rates, strict=True):
                assert rate is not None
                assert y == pytest.approx(PANEL_TOP + PANEL_HEIGHT * (1 - rate.rate), abs=0.01)
        assert len(by_class(panel, "circle", "model-line-point")) == 4
        assert len(by_class(panel, "circle", "ref-line-point")) == 4
        assert len(by_class(panel, "line", "interval")) == 8
    text = "".join(root.itertext())
    for label in (
        "BP budget curve",
        "ASR vs delta (5 poisons per instance)",
        "ASR vs poisons (delta 25.5/255)",
        "l-inf budget delta (/255)",
        "poisons per instance",
        "25.5",
        "100%",
        "undefended reference",
    ):
        assert label in text, label

    without = full_report(budget=False)
    with pytest.raises(ValueError, match="no budget curve"):
        budget_chart_svg(without)
    # Without a reference the chart has the model's lines only.
    alone = svg_of(budget_chart_svg(full_report(reference=False)))
    assert by_class(alone, "polyline", "ref-line") == []
    assert len(by_class(alone, "polyline", "model-line")) == 2


def test_the_page_has_every_section_of_a_v3_report_escaped() -> None:
    classes = [*CLASSES[:6], "Shirt <b>&", *CLASSES[7:]]
    report = full_report(path="/v1/models/<m&1>")
    report = report.model_copy(
        update={"dataset": report.dataset.model_copy(update={"classes": classes})}
    )
    page = render_report_html(report, {"fc": sample_grid()})
    assert "<b>" not in page and "<m&1>" not in page
    assert "Shirt &lt;b&gt;&amp; -&gt; T-shirt/top" in page  # the pair table, escaped
    sections = [
        "<h2>Verdict</h2>",
        "<h2>Headline: model vs undefended reference</h2>",
        "<h2>Attack success rate</h2>",
        "<h2>Pairs</h2>",
        "<h2>Budget curve</h2>",
        "<h2>Poisons</h2>",
    ]
    positions = [page.index(section) for section in sections]
    assert positions == sorted(positions)
    assert 'class="verdict inconclusive"' in page
    # How it was decided: the confidence, the bounds, which policy (a policy file's here).
    assert "Decided at 95% confidence by one-sided score bounds (Wilson; Newcombe" in page
    assert "; policy given with the audit.</p>" in page
    assert "; default policy.</p>" in render_report_html(
        full_report(policy=DEFAULT_POLICY), {"fc": sample_grid()}
    )
    assert "max_asr_relative_to_reference" in page and "0.50x" in page
    assert "-31.7 pp [-50.2, -8.9]" in page  # the comparison table
    assert "pre-trained by Bulwark without a defense (auto)" in page
    assert "3 of 40 instances not reached" in page
    assert "4 of 40 targets already misclassified by the clean model" in page
    assert "6 -&gt; 0 (closest, confusion 0.21)" in page
    assert "25.5/255" in page and "83.8% (31/37)" in page  # the budget table
    assert page.count("<svg") == 2
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and "<script" not in page and "<link" not in page

    plain = render_report_html(full_report(reference=False, budget=False), {})
    assert "reference: none (the audit was asked for none)" in plain
    assert "<h2>Headline</h2>" in plain and "vs undefended reference" not in plain
    assert "Budget curve" not in plain and plain.count("<svg") == 1
    # An old report: no verdict, reference, pairs or budget sections.
    old = render_report_html(legacy_report(), {})
    for section in ("Verdict", "Headline", "<h2>Pairs", "Budget curve"):
        assert section not in old
