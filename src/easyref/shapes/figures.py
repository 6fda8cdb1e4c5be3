"""PNG figures for ShapesWorld's documentation: rows of images with a caption under each row.

One layout serves every figure (example groups, the base model's samples, benchmark grids): a row
is a list of images, optionally split into labelled panels, followed by a line of text. Images are
enlarged with nearest-neighbour so single pixels stay visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from easyref.files import atomic_write
from easyref.shapes.groups import Group, sample_group
from easyref.shapes.world import render

_ZOOM = 2
_GAP = 6
_TEXT = 16


def _as_image(image: Image.Image | np.ndarray) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(image)


def rows_figure(rows: Sequence[tuple[Sequence[Sequence[Image.Image | np.ndarray]], str]], path: str | Path,
                title: str | None = None) -> Path:
    """Write a figure: each row is (panels, text), each panel a list of images drawn side by side.

    Panels are separated by a wider gap, so "references | target | output" reads at a glance.
    """
    font = ImageFont.load_default(size=12)
    size = 64 * _ZOOM

    def row_width(panels) -> int:
        return sum(len(p) * (size + 2) for p in panels) + _GAP * 3 * (len(panels) - 1)

    width = max(row_width(panels) for panels, _ in rows) + 2 * _GAP
    top = _TEXT + _GAP if title else 0
    height = top + len(rows) * (size + _TEXT + _GAP) + _GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_GAP, _GAP // 2), title, fill="black", font=font)
    y = top + _GAP
    for panels, text in rows:
        x = _GAP
        for panel in panels:
            for image in panel:
                canvas.paste(_as_image(image).convert("RGB").resize((size, size), Image.NEAREST), (x, y))
                x += size + 2
            x += _GAP * 3
        draw.text((_GAP, y + size + 1), text, fill="black", font=font)
        y += size + _TEXT + _GAP
    # 256 colours, no dithering: a third of the bytes for pictures that live in the repository's docs.
    palette = canvas.quantize(256, dither=Image.Dither.NONE)
    return atomic_write(path, lambda tmp: palette.save(tmp, format="PNG", optimize=True))


def group_row(group: Group, references: int | None = None) -> tuple[list[list[np.ndarray]], str]:
    """A group as a figure row: its references | its target, and its labels as text."""
    refs = [render(scene) for scene in group.references[:references]]
    hard = f", hard case: {group.hard}" if group.hard else ""
    text = f"{group.split} / {group.kind}{hard}  |  caption: \"{group.caption}\"  |  shared: {group.labels()['answer']}"
    return [refs, [render(group.target_scene)]], text


def example_groups_figure(path: str | Path, references: int = 5, seed: int = 0) -> Path:
    """Example groups of every split and kind, hard cases included (docs/SHAPESWORLD.md's picture)."""
    from easyref.shapes.groups import make_group

    groups = [sample_group("train", 0, references, seed), sample_group("train", 1, references, seed),
              sample_group("held-in", 0, references, seed), sample_group("held-in", 1, references, seed),
              make_group("held-in", "identity", 2, references, seed, hard="misaligned"),
              make_group("held-in", "style", 3, references, seed, hard="distractor"),
              make_group("held-out", "identity", 0, references, seed),
              make_group("held-out", "style", 1, references, seed),
              make_group("held-out", "scene", 2, references, seed)]
    return rows_figure([group_row(group) for group in groups], path,
                       title="ShapesWorld groups: references (spoiled views) | target")
