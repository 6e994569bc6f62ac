"""The verdict badge (core/badge.py): escaped text, well-formed SVG, boxes that fit the text."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

import pytest

from core.badge import OUTCOME_COLORS, badge_svg, text_width, verdict_badge_svg

SVG = "{http://www.w3.org/2000/svg}"


def _boxes(svg: str) -> dict[str, float]:
    root = ElementTree.fromstring(svg)
    return {
        r.get("class") or "": float(r.get("width") or 0)
        for r in root.iter(f"{SVG}rect")
        if r.get("class") in ("label", "message")
    }


def test_any_text_is_escaped_into_well_formed_svg():
    hostile_label, hostile_message = '<b a="1">&amp;', "x</text><script>alert(1)</script>'\""
    svg = badge_svg(hostile_label, hostile_message, '"/><script/>')
    root = ElementTree.fromstring(svg)  # raises on malformed XML
    assert not list(root.iter(f"{SVG}script")) and not list(root.iter("script"))
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert texts == [hostile_label, hostile_label, hostile_message, hostile_message]
    assert root.get("aria-label") == f"{hostile_label}: {hostile_message}"


def test_the_boxes_fit_the_text():
    assert text_width("") == 0
    # Verdana at 11 px: "bulwark" is about 42 px; a narrow "i" is far narrower than an "m".
    assert text_width("bulwark") == pytest.approx(42, abs=4)
    assert text_width("i") < text_width("m") / 3
    assert text_width("漢字") > text_width("ab")  # wide scripts take a full em
    short, long = _boxes(verdict_badge_svg("pass")), _boxes(verdict_badge_svg("inconclusive"))
    assert short["label"] == long["label"]
    assert long["message"] - short["message"] == pytest.approx(
        text_width("inconclusive") - text_width("pass"), abs=1
    )
    for outcome in ("pass", "fail", "inconclusive"):
        assert _boxes(verdict_badge_svg(outcome))["message"] >= text_width(outcome) + 10


@pytest.mark.parametrize(
    ("outcome", "message", "color"),
    [
        ("pass", "pass", "#4c1"),
        ("fail", "fail", "#e05d44"),
        ("inconclusive", "inconclusive", "#dfb317"),
        (None, "not audited", "#9f9f9f"),
    ],
)
def test_each_outcome_has_its_text_and_colour(outcome, message, color):
    root = ElementTree.fromstring(verdict_badge_svg(outcome))
    assert root.get("aria-label") == f"bulwark: {message}"
    (box,) = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "message"]
    assert box.get("fill") == color == OUTCOME_COLORS[message]
