"""Documentation figures: rows of images laid out as described, pixels kept (nearest-neighbour zoom)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from easyref.shapes import figures


def test_rows_figure_lays_out_panels_and_keeps_pixels(tmp_path):
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 200
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[..., 2] = 180
    path = figures.rows_figure([([[red, red], [blue]], "first"), ([[blue]], "second")], tmp_path / "f.png",
                               title="title")
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    size = 64 * figures._ZOOM
    widest = 3 * (size + 2) + figures._GAP * 3  # two panels: two images, then one, a panel gap between
    top = figures._TEXT + figures._GAP + figures._GAP
    assert pixels.shape == (top + 2 * (size + figures._TEXT + figures._GAP), widest + 2 * figures._GAP, 3)
    x = figures._GAP
    assert (pixels[top + 5, x + 5] == (200, 0, 0)).all()  # first image of the first panel
    x_blue = x + 2 * (size + 2) + figures._GAP * 3
    assert (pixels[top + size - 1, x_blue + size - 1] == (0, 0, 180)).all()  # last pixel of the second panel
