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

from core.pictures import MIN_TILE, poison_grid_png
from core.report import AuditReport, percent
from core.report_page import PLOT_HEIGHT, asr_chart_svg, render_report_html

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
    page = tmp_path / "report.html"
    page.write_text(render_report_html(sample_report(), {"fc": sample_grid(), "cp": sample_grid()}))
    shot = tmp_path / "out.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1600, 1200)
    assert (pixels < 200).mean() > 0.01, "the screenshot is blank"
