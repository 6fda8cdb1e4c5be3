"""Example groups of the bundled model: fixed by rule, deterministic, and usable from ``easyref generate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from easyref.cli import main
from easyref.errors import InvalidArgumentError
from easyref.shapes.examples import example_group, example_images, example_names, write_example
from easyref.shapes.groups import KINDS_BY_SPLIT


def test_one_plain_example_per_kind_of_each_test_split():
    groups = [example_group(name) for name in example_names()]
    assert sorted((g.split, g.kind) for g in groups) == sorted(
        (split, kind) for split in ("held-in", "held-out") for kind in KINDS_BY_SPLIT[split])
    assert all(g.hard is None and len(g.references) == 4 for g in groups)
    with pytest.raises(InvalidArgumentError, match="held-in-identity"):
        example_group("held-in-scene")


def test_examples_render_the_same_pixels_every_time(tmp_path):
    first = [np.asarray(image) for image in example_images(example_group("held-out-style"))]
    again = [np.asarray(image) for image in example_images(example_group("held-out-style"))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    folder = write_example("held-out-style", tmp_path)
    assert (folder / "caption.txt").read_text().strip() == example_group("held-out-style").caption
    with Image.open(folder / "ref-02.png") as image:
        assert np.array_equal(np.asarray(image), first[2])


def test_generate_from_an_example_uses_its_references_and_caption(tiny_model, tmp_path):
    out = tmp_path / "out.png"
    fast = ["--steps", "2", "--height", "64", "--width", "64"]
    assert main(["generate", "--model", str(tiny_model), "--example", "held-in-style", *fast,
                 "--output", str(out)]) == 0
    sidecar = json.loads((tmp_path / "out.json").read_text())
    group = example_group("held-in-style")
    assert sidecar["example"] == {"name": "held-in-style", "group": group.id, "caption": group.caption}
    assert sidecar["settings"]["prompt"] == group.caption
    # The same references given as files give the same pixels.
    folder = write_example("held-in-style", tmp_path / "files")
    refs = [arg for path in sorted(folder.glob("ref-*.png")) for arg in ("--ref", str(path))]
    assert main(["generate", "--model", str(tiny_model), *refs, "--prompt", group.caption, *fast,
                 "--output", str(tmp_path / "files.png")]) == 0
    with Image.open(out) as a, Image.open(tmp_path / "files.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_example_and_ref_together_are_refused(tiny_model, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_model), "--example", "held-in-style", "--ref", str(tmp_path),
                 "--output", str(tmp_path / "x.png")]) != 0
    assert "one of --ref, --example or --embeds" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
