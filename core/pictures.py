"""The poison grid picture: labelled, upscaled tiles as one PNG (Pillow, no torch).

One row per instance (base | poison ... | target), a header row naming the columns and a
label left of each row ("1 -> 2, success"). Tiles are enlarged with nearest-neighbour to at
least :data:`MIN_TILE` pixels so 8x8 and 28x28 images can be seen; the exact values stay in
the ``.npz`` written beside it (``core.audit``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 96  # the shortest side of an upscaled tile, in pixels
GAP = 4
PAD = 6
INK = (0, 0, 0)
SUCCESS_INK = (176, 0, 32)  # a successful poisoning is the bad news
FAILED_INK = (0, 110, 40)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default bitmap font (``load_default_imagefont`` from Pillow 10.1)."""
    bitmap = getattr(ImageFont, "load_default_imagefont", None)
    return bitmap() if bitmap is not None else ImageFont.load_default()


def tile_scale(height: int, width: int) -> int:
    """The integer factor that brings a ``height`` x ``width`` tile's shorter side to at least
    :data:`MIN_TILE`."""
    return max(1, math.ceil(MIN_TILE / max(1, min(height, width))))


def _tile(image: np.ndarray, scale: int) -> Image.Image:
    """A (C, H, W) uint8 array (C = 1 or 3) as an RGB image ``scale`` times larger."""
    array = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(1, 2, 0))
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).convert("RGB")
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)


def poison_grid_png(
    rows: Sequence[Sequence[np.ndarray]],
    *,
    column_labels: Sequence[str],
    row_labels: Sequence[str],
    row_success: Sequence[bool],
) -> bytes:
    """The grid as PNG bytes: ``rows[i][j]`` is a (C, H, W) uint8 tile, every tile the same
    shape; one label per column and per row (successful rows are labelled in red)."""
    if not rows or len(rows) != len(row_labels) or len(rows) != len(row_success):
        raise ValueError("poison_grid_png needs one label and one outcome per row")
    columns = len(rows[0])
    if len(column_labels) != columns or any(len(row) != columns for row in rows):
        raise ValueError("poison_grid_png needs the same number of tiles and column labels")
    _, height, width = np.asarray(rows[0][0]).shape
    scale = tile_scale(height, width)
    tile_w, tile_h = width * scale, height * scale
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return int(right - left), int(bottom - top)

    label_w = max(size(label)[0] for label in row_labels) + 2 * PAD
    header_h = max(size(label)[1] for label in column_labels) + 2 * PAD
    canvas = Image.new(
        "RGB",
        (label_w + columns * (tile_w + GAP) + GAP, header_h + len(rows) * (tile_h + GAP) + GAP),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(column_labels):
        text_w, _ = size(label)
        x = label_w + GAP + j * (tile_w + GAP) + (tile_w - text_w) // 2
        draw.text((x, PAD), label, fill=INK, font=font)
    for i, (row, label, success) in enumerate(zip(rows, row_labels, row_success, strict=True)):
        top = header_h + GAP + i * (tile_h + GAP)
        _, text_h = size(label)
        ink = SUCCESS_INK if success else FAILED_INK
        draw.text((PAD, top + (tile_h - text_h) // 2), label, fill=ink, font=font)
        for j, tile in enumerate(row):
            canvas.paste(_tile(tile, scale), (label_w + GAP + j * (tile_w + GAP), top))
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    return buffer.getvalue()
