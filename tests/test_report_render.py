"""core.report's one renderer of a report's tables (the CLI's table, the card's markdown): the
/3 parts (headline among correctly classified targets, reference and difference, lower bounds,
pairs, budget curve) where a report has them, and a /2 report exactly as it always rendered."""

from __future__ import annotations

import pytest
from report_fixtures import full_report, legacy_report

from core.report import (
    ASR_COLUMNS,
    BUDGET_COLUMNS,
    PAIR_COLUMNS,
    asr_columns,
    asr_rows,
    render_asr_table,
)

# What the renderer printed for this /2 report before /3 existed (the fixture's audit, as a
# /2 report stored it): a terminal and a card must keep showing old reports the same way.
MODEL_LINE = (
    "model /v1/models/6f1c2f0e-convnet (convnet, defense at-pcl), Pre. Acc 85.34%; dataset "
    "fashion-mnist"
)
PROTOCOL_LINES = (
    "protocol: 40 instances over pairs [[6, 0], [4, 2], [1, 3], [9, 7]], delta 0.1000, 500 "
    "iterations, head re-trained 10 epochs (pretrained head)\n"
    "feature screen (200 test images, PGD-10 at delta 0.1000): separation 1.420 (Eq. 4a, larger "
    "resists better), normalized drift 0.120 (Eq. 4b, smaller resists better)"
)
LEGACY_TEXT = "\n".join(
    [
        MODEL_LINE,
        "attack  ASR            95% CI        baseline  Re. Acc   ",  # padded, as it always was
        "FC      15.0% (6/40)   [7.1, 29.1]   2.5%      87.60±0.14",
        "BP      32.5% (13/40)  [20.1, 48.0]  2.5%      87.60±0.14",
        PROTOCOL_LINES,
    ]
)
LEGACY_MARKDOWN = "\n".join(
    [
        MODEL_LINE,
        "",
        "| attack | ASR | 95% CI | baseline | Re. Acc |",
        "|---|---|---|---|---|",
        "| FC | 15.0% (6/40) | [7.1, 29.1] | 2.5% | 87.60±0.14 |",
        "| BP | 32.5% (13/40) | [20.1, 48.0] | 2.5% | 87.60±0.14 |",
        "",
        PROTOCOL_LINES,
    ]
)


def test_a_v2_report_renders_exactly_as_before() -> None:
    report = legacy_report()
    assert report.schema_version == "bulwark-audit/2"
    assert render_asr_table(report) == LEGACY_TEXT
    assert render_asr_table(report, markdown=True) == LEGACY_MARKDOWN
    assert "ref. ASR" not in asr_columns(report)


def test_the_headline_is_among_correct_targets_next_to_the_reference() -> None:
    report = full_report()
    assert asr_columns(report) == ASR_COLUMNS
    rows = {row[0]: dict(zip(ASR_COLUMNS, row, strict=True)) for row in asr_rows(report)}
    # 4 of 40 targets are misclassified by the clean model: FC succeeds on 6 of 40, 2 of them
    # among those, so 4 of the 36 others; the reference gets 37 right.
    assert rows["FC"] == {
        "attack": "FC",
        "ASR": "11.1% (4/36)",
        "95% CI": "[4.4, 25.3]",
        "ref. ASR": "27.0% (10/37)",
        "difference [95% CI]": "-15.9 pp [-33.2, 2.4]",
        "baseline": "0.0%",
        "Re. Acc": "87.60±0.14",
    }
    assert rows["BP"]["ASR"] == "27.8% (10/36) (lower bound)"
    assert rows["BP"]["ref. ASR"] == "59.5% (22/37)"
    assert rows["BP"]["difference [95% CI]"] == "-31.7 pp [-50.2, -8.9]"

    text = render_asr_table(report)
    lines = text.splitlines()
    assert lines[0].startswith("model /v1/models/6f1c2f0e-convnet (convnet, defense at-pcl)")
    assert lines[1].startswith(
        "reference: /v1/models/reference-convnet-fashion-mnist (convnet, defense none; "
        "pre-trained by Bulwark without a defense (auto)), Pre. Acc 87.12%"
    )
    assert "its clean model classifies 37 of their targets correctly" in lines[1]
    header = next(line for line in lines if line.startswith("attack  ASR"))
    fc_row = next(line for line in lines if line.startswith("FC  "))
    # Aligned columns: each cell starts under its header.
    for column, cell in (("ref. ASR", "27.0% (10/37)"), ("difference", "-15.9 pp")):
        assert header.index(column) == fc_row.index(cell)
    assert (
        "(lower bound) BP: 3 of 40 instances not reached (their poisons ended at a relative "
        "feature distance above 0.5 from the target), so its ASR is a lower bound" in lines
    )
    assert not any(line.startswith("(lower bound) FC") for line in lines)
    assert (
        "4 of 40 targets already misclassified by the clean model are excluded from the "
        "headline (ASR over all instances: FC 15.0%, BP 32.5%)" in lines
    )
    assert (
        "pairs: 6 -> 0 (closest, confusion 0.21), 4 -> 2 (closest, confusion 0.15), "
        "1 -> 3 (random), 9 -> 7 (random)" in lines
    )
    assert "protocol: 40 instances over 4 pairs (2 closest, 2 random), delta 0.1000" in text


def test_the_pair_and_budget_tables() -> None:
    lines = render_asr_table(full_report()).splitlines()
    pair_rows = [line.split() for line in lines if line.startswith(("FC  ", "BP  "))]
    # The ASR table's two rows, then eight pair rows (attack, class names, source, k/n).
    assert len(pair_rows) == 2 + 8
    joined = [" ".join(row) for row in pair_rows[2:]]
    assert joined[0] == "FC Shirt -> T-shirt/top closest 30.0% (3/10) 10.0% (1/10)"
    assert joined[2] == "FC Trouser -> Dress random 0.0% (0/10) 0.0% (0/10)"
    assert joined[4] == "BP Shirt -> T-shirt/top closest 60.0% (6/10) 10.0% (1/10)"
    assert joined[7] == "BP Ankle boot -> Sneaker random 20.0% (2/10) 0.0% (0/10)"

    title = lines.index(
        "budget curve (BP): ASR as the attacker's l-inf budget delta and poisons per instance move:"
    )
    assert lines[title + 1].split() == [
        "sweep",
        "delta",
        "poisons",
        "ASR",
        "ref.",
        "ASR",
        "baseline",
    ]
    budget = [line.split() for line in lines[title + 2 : title + 10]]
    assert [row[:3] for row in budget] == [
        ["delta", "4/255", "5"],
        ["delta", "8/255", "5"],
        ["delta", "16/255", "5"],
        ["delta", "25.5/255", "5"],
        ["poisons", "25.5/255", "1"],
        ["poisons", "25.5/255", "5"],
        ["poisons", "25.5/255", "10"],
        ["poisons", "25.5/255", "25"],
    ]
    assert budget[0][3:] == ["2.8%", "(1/36)", "10.8%", "(4/37)", "0.0%"]
    # The audit's own budget is the headline, in both sweeps.
    assert budget[3][3:5] == budget[5][3:5] == ["27.8%", "(10/36)"]


def test_markdown_tables_are_well_formed_and_separated_by_blank_lines() -> None:
    markdown = render_asr_table(full_report(), markdown=True)
    lines = markdown.splitlines()
    tables: list[list[str]] = []
    for index, line in enumerate(lines):
        if line.startswith("|") and (index == 0 or not lines[index - 1].startswith("|")):
            assert lines[index - 1] == "", f"no blank line before the table at {line!r}"
            tables.append([])
        if line.startswith("|"):
            tables[-1].append(line)
    assert [len(table) for table in tables] == [4, 10, 10]
    for table, columns in zip(tables, (ASR_COLUMNS, PAIR_COLUMNS, BUDGET_COLUMNS), strict=True):
        assert table[0] == "| " + " | ".join(columns) + " |"
        for row in table:
            assert row.count("|") == len(columns) + 1, row
    assert "| BP | 27.8% (10/36) (lower bound) | [15.8, 44.0] | 59.5% (22/37) |" in markdown
    # Each note is its own paragraph, not run into the next line.
    for note in ("(lower bound) BP:", "4 of 40 targets", "pairs: 6 -> 0", "reference: /v1/"):
        (at,) = [n for n, text in enumerate(lines) if text.startswith(note)]
        assert lines[at - 1] == "" and lines[at + 1] == ""


def test_without_a_reference_the_columns_say_so_and_the_note_says_why() -> None:
    report = full_report(reference=False, budget=False)
    text = render_asr_table(report)
    assert "reference: none (the audit was asked for none)" in text
    rows = {row[0]: row for row in asr_rows(report)}
    assert rows["FC"][3:5] == ("-", "-")
    assert "budget curve" not in text

    # A reference without a comparison entry still shows the reference's headline.
    partial = full_report().model_copy(update={"comparison": {}})
    fc = dict(zip(ASR_COLUMNS, asr_rows(partial)[0], strict=True))
    assert (fc["ref. ASR"], fc["difference [95% CI]"]) == ("27.0% (10/37)", "-")


@pytest.mark.parametrize("markdown", [False, True])
def test_a_v3_report_without_the_correct_target_headline_uses_all_instances(
    markdown: bool,
) -> None:
    report = full_report(reference=False, budget=False)
    attacks = {
        name: result.model_copy(
            update={"asr_correct_targets": None, "baseline_correct_targets": None, "unreached": 0}
        )
        for name, result in report.attacks.items()
    }
    text = render_asr_table(report.model_copy(update={"attacks": attacks}), markdown=markdown)
    assert "15.0% (6/40)" in text and "32.5% (13/40)" in text
    assert "excluded from the headline" not in text and "lower bound" not in text


def test_a_sequential_audit_says_how_it_ran_and_the_work_it_saved() -> None:
    """The rounds run of those planned, the look's confidence, what stopped it and the
    crafting work against a full audit's, in the terminal table, the card's markdown and the
    HTML page (one line, core.report.sequential_line); an audit in one go has no such line."""
    from core.report import SequentialFacts
    from core.report_page import render_report_html

    plain = full_report()
    assert "sequential:" not in render_asr_table(plain)
    facts = SequentialFacts(
        rounds_planned=4,
        rounds_run=2,
        instances_planned=80,
        instances_run=40,
        look_confidence=0.9875,
        stopped="fail decided after round 2 of 4 at 98.75% per look: BP fails",
        early_stop_every=25,
        crafting_work=30_000,
        crafting_work_full=120_000,
    )
    report = plain.model_copy(update={"sequential": facts})
    expected = (
        "sequential: 40 of 80 planned instances in 2 of 4 rounds, the verdict looked at after "
        "each at 98.75%, instances whose poisons succeed stopped every 25 iterations; fail "
        "decided after round 2 of 4 at 98.75% per look: BP fails; crafting work 30,000 of "
        "120,000 poison passes (25%)"
    )
    assert expected in render_asr_table(report).splitlines()
    assert expected in render_asr_table(report, markdown=True).splitlines()
    page = render_report_html(report, {})
    assert "<dt>sequential</dt><dd>40 of 80 planned instances" in page
    assert "crafting work 30,000 of 120,000 poison passes (25%)</dd>" in page
