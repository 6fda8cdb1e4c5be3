"""``data groups`` and ``data check`` on a made-up folder tree with broken files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from easyref.cli import main
from easyref.training.datatools import build_groups, check_data


def noise(path, width=96, height=80, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def tree(tmp_path):
    """groups/: cat (3 images, captions from a sidecar and captions.json), dog (2, one truncated),
    lonely (1 image: skipped); plus a loose image, a hidden file and a non-image."""
    root = tmp_path / "groups"
    for group, count in (("cat", 3), ("dog", 2), ("lonely", 1)):
        (root / group).mkdir(parents=True)
        for i in range(count):
            noise(root / group / f"{i}.png", seed=i)
    (root / "cat" / "0.txt").write_text("a cat on a sofa\na sleeping cat\n")
    (root / "cat" / "captions.json").write_text(json.dumps({"1.png": "a cat in the sun", "0.png": "ignored"}))
    (root / "cat" / ".hidden.png").write_bytes(b"not an image")
    (root / "cat" / "notes.md").write_text("not an image")
    good = (root / "dog" / "1.png").read_bytes()
    (root / "dog" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    noise(root / "loose.png")
    return root


def test_data_groups_writes_the_release_format(tree, tmp_path, capsys):
    output = tmp_path / "groups.json"
    assert main(["data", "groups", str(tree), "--output", str(output)]) == 0
    records = json.loads(output.read_text())
    assert len(records) == 5  # cat: 3 targets, dog: 2 targets; lonely skipped
    by_target = {r["target"]: r for r in records}
    assert by_target["cat/0.png"] == {"image_file": ["cat/1.png", "cat/2.png"],
                                      "text": ["a cat on a sofa", "a sleeping cat"], "target": "cat/0.png"}
    assert by_target["cat/1.png"]["text"] == ["a cat in the sun"]
    assert by_target["cat/2.png"]["text"] == []
    assert by_target["dog/1.png"]["image_file"] == ["dog/0.png"]
    err = capsys.readouterr().err
    assert "skipped group lonely" in err and "ignored 1 image(s)" in err


def test_data_check_counts_every_problem_before_training(tree, tmp_path, capsys):
    records, _ = build_groups(tree)
    noise(tree / "tiny.png", width=12, height=10)
    Image.new("RGB", (40, 30)).save(tree / "face_target.png")
    records += [
        {"image_file": ["cat/missing.png"], "text": ["x"], "target": "cat/0.png"},  # no usable reference
        {"image_file": ["tiny.png"], "text": ["x"], "target": "tiny.png"},  # usable but too small
        {"face": [[100, 100, 120, 130]], "text": ["x"], "target": "face_target.png"},  # box outside
        {"face": [[1, 1, 20, 20]], "text": ["x"], "target": "gone.png"},  # target missing
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    report = check_data(data, tree, min_size=32)
    assert report.records == 9 and report.kinds == {"single": 1, "group": 6, "face": 2}
    assert report.missing == ["cat/missing.png", "gone.png"]
    assert list(report.unreadable) == ["dog/1.png"] and "truncated" in report.unreadable["dog/1.png"]
    assert report.too_small == {"tiny.png": [12, 10], "face_target.png": [40, 30]}
    assert report.bad_target == [4, 8]  # dog/1.png as a target, and gone.png
    assert report.no_references == [3, 5]  # dog/0.png's only reference is broken; cat/missing.png
    assert report.face_outside == [7]
    assert report.usable == 4
    report_file = tmp_path / "report.json"
    status = main(["data", "check", "--data", str(data), "--image-root", str(tree), "--min-size", "32",
                   "--report", str(report_file)])
    out = capsys.readouterr().out
    assert status == 1
    assert "images unreadable:" in out and "usable records:" in out and "problem(s) found" in out
    assert json.loads(report_file.read_text())["usable"] == 4


def test_data_check_passes_clean_data_and_names_bad_format(tree, tmp_path, capsys):
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps([{"image_file": ["cat/1.png"], "text": ["x"], "target": "cat/0.png"}]))
    assert main(["data", "check", "--data", str(clean), "--image-root", str(tree), "--min-size", "32"]) == 0
    assert "no problems found" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_file": ["a"], "text": ["x"], "target": "t"}, {"text": ["x"], "target": "t"}]))
    assert main(["data", "check", "--data", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "record 1" in err[0]


def test_paths_that_leave_the_image_root_are_never_opened(tree, tmp_path):
    """`../` and absolute paths in records are reported as outside the root, whether or not the file exists
    (an existence check would reveal files elsewhere); training skips such records and counts them."""
    from easyref.training.data import TrainingDataset
    from easyref.training.options import Augmentations
    from easyref.training.records import parse_records

    secret = tmp_path / "secret.png"
    noise(secret)
    records = [{"image_file": ["../secret.png"], "text": ["x"], "target": "cat/0.png"},
               {"image_file": [str(secret)], "text": ["x"], "target": str(secret)},
               {"image_file": ["cat/../cat/1.png"], "text": ["x"], "target": "cat/0.png"}]  # stays inside: fine
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    report = check_data(data, tree, min_size=8)
    assert sorted(report.outside) == sorted(["../secret.png", str(secret)]) and report.missing == []
    assert "leaves" in report.outside["../secret.png"] and "absolute" in report.outside[str(secret)]
    assert report.usable == 1
    assert check_data(data, tree, min_size=8, allow_absolute=True).usable == 2
    dataset = TrainingDataset(parse_records(records[:2] + records[2:]), tree, Augmentations(resolution=64), seed=0)
    sample = dataset[0]  # record 0 leaves the root, record 1 is absolute: both skipped, record 2 used
    assert (sample.record, sample.skipped) == (2, 2)
