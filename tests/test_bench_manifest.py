"""Benchmark manifests: built from a folder tree or COCO captions, validated line by line when loaded."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from easyref.bench.commands import add_commands
from easyref.bench.manifest import (
    BenchFormatError,
    build_manifest,
    load_coco,
    load_manifest,
    write_manifest,
)
from easyref.errors import InvalidArgumentError


def _images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), (len(name) * 20 % 256, 0, 0)).save(folder / name)


@pytest.fixture
def tree(tmp_path) -> Path:
    """animals (2 groups + a singleton), logos (1 group, held out below)."""
    root = tmp_path / "groups"
    _images(root / "animals" / "cats", "b.png", "a.jpg", "c.png")
    (root / "animals" / "cats" / "caption.txt").write_text("  a cat on a sofa \n")
    _images(root / "animals" / "my dog!", "x.png", "y.png")
    (root / "animals" / "my dog!" / "captions.json").write_text(json.dumps({"y.png": "a dog", "x.png": "no"}))
    _images(root / "animals" / "alone", "only.png")
    _images(root / "logos" / "acme", "1.png", "2.PNG", ".hidden.png")
    (root / "logos" / "acme" / "notes.txt").write_text("not an image")
    return root


def test_build_holds_back_the_last_image_and_splits_by_domain(tree, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        manifest = build_manifest(tree, tmp_path / "bench.jsonl", held_out_domains=["logos"])
    groups = {g.id: g for g in load_manifest(manifest)}
    assert list(groups) == ["animals-cats", "animals-my_dog_", "logos-acme"]
    cats = groups["animals-cats"]
    assert cats.target.name == "c.png" and [p.name for p in cats.references] == ["a.jpg", "b.png"]
    assert cats.caption == "a cat on a sofa" and cats.split == "held-in" and cats.domain == "animals"
    assert groups["animals-my_dog_"].caption == "a dog"
    acme = groups["logos-acme"]
    assert acme.split == "held-out" and acme.target.name == "2.PNG" and acme.caption == ""
    assert "skipped 1 group(s) with fewer than 2 images" in caplog.text
    assert "1 group(s) have no caption" in caplog.text
    assert '"references": ["groups/animals/cats/a.jpg", ' in manifest.read_text()  # relative to the manifest
    first = manifest.read_bytes()
    assert build_manifest(tree, manifest, held_out_domains=["logos"]).read_bytes() == first


def test_build_refuses_unknown_domains_and_colliding_ids(tree, tmp_path):
    with pytest.raises(InvalidArgumentError, match="held-out domain.*logo "):
        build_manifest(tree, tmp_path / "bench.jsonl", held_out_domains=["logo "])
    _images(tree / "animals" / "my dog_", "1.png", "2.png")
    with pytest.raises(BenchFormatError, match="both give the id 'animals-my_dog_'"):
        build_manifest(tree, tmp_path / "bench.jsonl", held_out_domains=[])
    assert not (tmp_path / "bench.jsonl").exists()


def _coco(tmp_path: Path, image_ids=(3, 1, 2)) -> tuple[Path, Path]:
    images = tmp_path / "val2017"
    _images(images, *(f"{i:012d}.jpg" for i in image_ids))
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in image_ids],
        "annotations": [{"image_id": 3, "caption": "three first "}, {"image_id": 1, "caption": "one"},
                        {"image_id": 3, "caption": "three second"}],  # image 2 has no caption
    }))
    return captions, images


def test_coco_images_are_their_own_single_reference(tmp_path):
    captions, images = _coco(tmp_path)
    groups = load_coco(captions, images)
    assert [(g.id, g.caption) for g in groups] == [("coco-1", "one"), ("coco-3", "three first")]
    assert all(g.references == (g.target,) and g.split == g.domain == "coco" for g in groups)
    assert [g.id for g in load_coco(captions, images, limit=1)] == ["coco-1"]
    reloaded = load_manifest(write_manifest(groups, tmp_path / "coco.jsonl"))
    assert reloaded == groups


def test_coco_problems_are_named(tmp_path):
    captions, images = _coco(tmp_path)
    (images / "000000000003.jpg").unlink()
    with pytest.raises(BenchFormatError, match="COCO image 3: missing file"):
        load_coco(captions, images)
    captions.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(BenchFormatError, match="not a COCO captions file"):
        load_coco(captions, images)


def _line(**changes) -> str:
    record = {"id": "g1", "split": "held-in", "domain": "d", "references": ["a.png"], "target": "t.png",
              "caption": "c"}
    return json.dumps({**record, **changes})


@pytest.mark.parametrize(("lines", "message"), [
    ([_line(), _line()], "line 2: duplicate id 'g1' \\(first on line 1\\)"),
    ([_line(references=["a.png", "gone.png"])], "line 1 \\(group g1\\): missing file .*gone.png"),
    ([_line(references=[])], "line 1: references must be a non-empty list"),
    ([_line(), '{"id": "g2", '], "line 2: not valid JSON"),
    ([_line(split="train")], "split must be one of held-in, held-out, coco"),
    ([_line(id="a/b")], "id 'a/b' may hold only letters, digits"),
    ([_line(id="-ab")], "id '-ab' must start with a letter or a digit"),
    ([_line(id="a" * 200)], "id is 200 characters long; at most 128"),
    ([_line(id=7)], "id must be a string, got int"),
    ([_line(), "[" * 100_000 + "]" * 100_000], "line 2: JSON nested too deeply to read"),
    ([_line(references=["../a.png"])], "line 1 \\(group g1\\): ../a.png leaves"),  # checked before any file is
    ([_line(target="sub/../../t.png")], "line 1 \\(group g1\\): sub/../../t.png leaves"),  # looked at
])
def test_manifest_validation_names_the_line(tmp_path, lines, message):
    _images(tmp_path, "a.png", "t.png")
    manifest = tmp_path / "bench.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchFormatError, match=message):
        load_manifest(manifest)


def bench_parser() -> argparse.ArgumentParser:
    """The ``easyref`` parser's bench half, as the CLI mounts it."""
    parser = argparse.ArgumentParser(prog="easyref")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_bench_build_command(tree, tmp_path, capsys):
    args = bench_parser().parse_args(["bench", "build", str(tree), "--held-out-domains", "logos",
                                      "--output", str(tmp_path / "bench.jsonl")])
    assert args.handler(args) == 0
    assert "3 groups (2 held-in, 1 held-out)" in capsys.readouterr().out
