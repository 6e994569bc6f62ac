"""A model's verdict as a shields-style badge (SVG), torch-free (the API serves it).

:func:`badge_svg` draws a two-part badge, a grey label and a coloured message, with the
layout of shields.io's "flat" style; :func:`verdict_badge_svg` is "bulwark | pass" (green),
"fail" (red), "inconclusive" (amber) or "not audited" (grey). No font is embedded or fetched:
text widths come from Verdana's advance widths (the badge's first font), so the boxes fit the
text wherever Verdana or a font of similar width draws it.
"""

from __future__ import annotations

from html import escape

LABEL = "bulwark"
NOT_AUDITED = "not audited"
VERDICT_OUTCOMES = ("pass", "fail", "inconclusive")
LABEL_COLOR = "#555"
OUTCOME_COLORS = {
    "pass": "#4c1",  # green
    "fail": "#e05d44",  # red
    "inconclusive": "#dfb317",  # amber
    NOT_AUDITED: "#9f9f9f",  # grey
}

FONT_SIZE = 11
HEIGHT = 20
PADDING = 6  # each side of a text
UNITS_PER_EM = 2048
# Verdana's advance widths (units per em 2048) of the characters badges mostly hold.
_LOWERCASE = (
    *(1255, 1300, 1114, 1300, 1233, 720, 1300, 1316, 562, 677, 1212, 562, 2019),  # a-m
    *(1316, 1271, 1300, 1300, 880, 1085, 839, 1316, 1212, 1661, 1212, 1212, 1087),  # n-z
)
_ADVANCE = {
    **dict(zip("abcdefghijklmnopqrstuvwxyz", _LOWERCASE, strict=True)),
    **dict.fromkeys("0123456789", 1303),
    **dict.fromkeys("ABCEKPRSVXZ", 1405),
    **dict.fromkeys("DGHNOQU", 1560),
    **dict.fromkeys("FLTYJ", 1200),
    "I": 868,
    "M": 1729,
    "W": 2052,
    " ": 720,
    ".": 745,
    ",": 745,
    ":": 889,
    ";": 889,
    "!": 827,
    "|": 1116,
    "'": 550,
    "-": 861,
    "_": 1303,
    "(": 932,
    ")": 932,
    "/": 1182,
    "%": 2220,
}
_DEFAULT_ADVANCE = 1300  # other Latin text: about a lowercase letter
_WIDE_ADVANCE = 2048  # CJK and other wide scripts: a full em


def text_width(text: str, font_size: float = FONT_SIZE) -> float:
    """The width of ``text`` in Verdana at ``font_size`` px, to a tenth of a pixel."""
    units = sum(
        _ADVANCE.get(ch, _DEFAULT_ADVANCE if ord(ch) < 0x2E80 else _WIDE_ADVANCE) for ch in text
    )
    return round(units * font_size / UNITS_PER_EM, 1)


def badge_svg(label: str, message: str, color: str) -> str:
    """A shields-style flat badge: ``label`` on grey, ``message`` on ``color``; every text is
    escaped, so any label or message gives well-formed XML."""
    label_width = round(text_width(label) + 2 * PADDING)
    message_width = round(text_width(message) + 2 * PADDING)
    width = label_width + message_width
    title = escape(f"{label}: {message}")
    color = escape(color)

    def text(content: str, center: float) -> str:
        # A darker copy one pixel down is the shadow that keeps white text legible on amber.
        shown = escape(content)
        return (
            f'<text x="{center:g}" y="15" fill="#010101" fill-opacity=".3">{shown}</text>'
            f'<text x="{center:g}" y="14">{shown}</text>'
        )

    return "".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" '
            f'viewBox="0 0 {width} {HEIGHT}" role="img" aria-label="{title}">',
            f"<title>{title}</title>",
            '<linearGradient id="smooth" x2="0" y2="100%">'
            '<stop offset="0" stop-color="#bbb" stop-opacity=".1"/>'
            '<stop offset="1" stop-opacity=".1"/></linearGradient>',
            f'<clipPath id="round"><rect width="{width}" height="{HEIGHT}" rx="3" fill="#fff"/>'
            "</clipPath>",
            '<g clip-path="url(#round)">',
            f'<rect class="label" width="{label_width}" height="{HEIGHT}" fill="{LABEL_COLOR}"/>',
            f'<rect class="message" x="{label_width}" width="{message_width}" height="{HEIGHT}" '
            f'fill="{color}"/>',
            f'<rect width="{width}" height="{HEIGHT}" fill="url(#smooth)"/>',
            "</g>",
            '<g fill="#fff" text-anchor="middle" '
            f'font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="{FONT_SIZE}">',
            text(label, label_width / 2),
            text(message, label_width + message_width / 2),
            "</g>",
            "</svg>",
        ]
    )


def verdict_badge_svg(outcome: str | None) -> str:
    """The badge of a verdict outcome (``pass``, ``fail``, ``inconclusive``); None, or an
    outcome this version does not know, is "not audited"."""
    message = outcome if outcome in VERDICT_OUTCOMES else NOT_AUDITED
    return badge_svg(LABEL, message, OUTCOME_COLORS[message])
