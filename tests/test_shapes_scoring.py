"""Judge scores for benchmark runs: each image is checked against its own group's labels."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from easyref.bench.manifest import load_manifest
from easyref.bench.runs import open_run, write_group
from easyref.images import load_image
from easyref.shapes.export import MANIFEST, WorldSettings, write_world
from easyref.shapes.judge import Judgement
from easyref.shapes.scoring import read_scores, score_run, summarize_run
from easyref.shapes.world import ATTRIBUTES


class Oracle:
    """A judge that knows the true attributes of every image it was shown (looked up by pixel hash)."""

    def __init__(self, truth: dict[str, dict[str, str]]) -> None:
        self.truth = truth

    def classify(self, images) -> Judgement:
        rows = [self.truth[hashlib.sha256(np.asarray(image).tobytes()).hexdigest()] for image in images]
        attributes = {}
        for name, values in ATTRIBUTES.items():
            labels = np.array([values.index(row[name]) for row in rows])
            attributes[name] = (labels, np.eye(len(values))[labels])
        return Judgement(attributes, np.ones(len(rows)), 0.5, 0.5)


@pytest.fixture
def world(tmp_path):
    settings = WorldSettings(pairs=1, crops=1, groups=1, train_references=2, held_in=4, held_out=6,
                             test_references=3, manifest_references=2)
    write_world(tmp_path / "w", settings, workers=1, progress=False)
    return tmp_path / "w" / MANIFEST


def _run(tmp_path, manifest, name, pick_target):
    groups = load_manifest(manifest)
    run = open_run(tmp_path / name, manifest, "easyref", {})
    for i, group in enumerate(groups):
        image = load_image(pick_target(groups, i).target)
        write_group(run, group, [image], [{"seed": 0}])
    return run, groups


def _truth(manifest) -> dict[str, dict[str, str]]:
    truth = {}
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        image = load_image(manifest.parent / record["target"])
        truth[hashlib.sha256(np.asarray(image).tobytes()).hexdigest()] = record["shapes"]["target"]
    return truth


def test_targets_score_perfectly_and_other_groups_targets_do_not(tmp_path, world):
    oracle = Oracle(_truth(world))
    perfect, groups = _run(tmp_path, world, "perfect", lambda groups, i: groups[i])
    score_run(perfect, oracle)
    rows = read_scores(perfect)
    assert len(rows) == len(groups)
    assert all(row["concept_ok"] and row["prompt_ok"] and row["both"] for row in rows)
    assert {row["split"] for row in rows} == {"held-in", "held-out"}

    shifted, _ = _run(tmp_path, world, "shifted", lambda groups, i: groups[(i + 1) % len(groups)])
    score_run(shifted, oracle)
    labels = {json.loads(line)["id"]: json.loads(line)["shapes"] for line in world.read_text().splitlines()}
    ids = [g.id for g in groups]
    expected = []  # independent: compare the neighbour's true attributes with this group's concept by name
    for i, group_id in enumerate(ids):
        shown = labels[ids[(i + 1) % len(ids)]]["target"]
        concept = labels[group_id]["concept"]
        expected.append(all(ATTRIBUTES[k][v] == shown[k] for k, v in concept.items()))
    got = {row["group_id"]: row["concept_ok"] for row in read_scores(shifted)}
    assert [got[group_id] for group_id in ids] == expected
    summary = summarize_run(shifted)
    assert set(summary) == {"held-in", "held-out"}
    held_in = [e for e, g in zip(expected, ids, strict=True) if g.startswith("held-in")]
    assert summary["held-in"]["concept_ok"]["mean"] == pytest.approx(np.mean(held_in))
