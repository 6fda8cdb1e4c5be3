"""ShapesWorld's renderer, splits, groups and on-disk formats."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from easyref.bench.manifest import load_manifest
from easyref.cli import main
from easyref.shapes.export import MANIFEST, MANIFEST_ALL, WorldSettings, write_world
from easyref.shapes.groups import CONCEPT_ATTRIBUTES, PROMPT_ATTRIBUTES, make_group, sample_group
from easyref.shapes.splits import (
    is_held_out,
    object_allowed,
    object_triple_held_out,
    random_train_attributes,
    style_triple_held_out,
)
from easyref.shapes.world import (
    ATTRIBUTES,
    IMAGE_SIZE,
    Attributes,
    Scene,
    clean_scene,
    random_attributes,
    render,
)
from easyref.training.records import load_records


def test_render_is_a_pure_function_of_the_seed():
    a = random_attributes(np.random.default_rng(5))
    first = render(clean_scene(a, np.random.default_rng(7)))
    again = render(clean_scene(a, np.random.default_rng(7)))
    other_pose = render(clean_scene(a, np.random.default_rng(8)))
    assert first.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_pose)


def test_each_attribute_changes_the_pixels():
    base = Attributes(shape=0, colour=0, pattern=0, size=0, position=4, background=0, texture=0)
    reference = render(clean_scene(base, np.random.default_rng(0)))
    for name, values in ATTRIBUTES.items():
        for value in set(range(len(values))) - {getattr(base, name)}:
            changed = render(clean_scene(base.replace(**{name: value}), np.random.default_rng(0)))
            assert np.abs(changed.astype(int) - reference).sum() > 500, (name, value)


def test_object_colour_is_where_the_position_says():
    """The main object's colour dominates its 3x3 cell (top left here) and is absent from the opposite one."""
    a = Attributes(shape=1, colour=0, pattern=0, size=1, position=0, background=0, texture=0)
    image = render(clean_scene(a, np.random.default_rng(0))).astype(int)
    red = (image[..., 0] > 180) & (image[..., 1] < 80)
    assert red[:22, :22].mean() > 0.5
    assert red[42:, 42:].sum() == 0


def test_attributes_refuse_out_of_range_values():
    with pytest.raises(ValueError, match="shape must be an index below 6"):
        Attributes(shape=6, colour=0, pattern=0, size=0, position=0, background=0, texture=0)


def test_every_value_pair_survives_the_held_out_triples():
    objects = [t for t in itertools.product(range(6), range(6), range(3)) if not object_triple_held_out(*t)]
    styles = [t for t in itertools.product(range(6), range(3), range(3)) if not style_triple_held_out(*t)]
    for triples, sizes in ((objects, (6, 6, 3)), (styles, (6, 3, 3))):
        assert len(triples) < np.prod(sizes)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert {(t[i], t[j]) for t in triples} == set(itertools.product(range(sizes[i]), range(sizes[j])))


def _objects_in(scene: Scene):
    return [(o.shape, o.colour, o.pattern) for o in scene.objects]


def test_training_data_never_contains_a_held_out_combination():
    rng = np.random.default_rng(0)
    assert not any(is_held_out(random_train_attributes(rng)) for _ in range(2000))
    for index in range(150):
        group = sample_group("train", index, 6)
        assert not is_held_out(group.target)
        for scene in (*group.references, group.target_scene):
            for shape, colour, pattern in _objects_in(scene):
                assert object_allowed(shape, colour, pattern)
            assert not any(style_triple_held_out(scene.background, scene.texture, o.pattern)
                           for o in scene.objects)


def test_held_out_groups_use_only_unseen_concepts_or_the_unseen_kind():
    for index in range(60):
        group = sample_group("held-out", index, 2)
        c = group.concept
        if group.kind == "identity":
            assert object_triple_held_out(c["shape"], c["colour"], c["pattern"])
        elif group.kind == "style":
            assert style_triple_held_out(c["background"], c["texture"], c["pattern"])
        else:
            assert group.kind == "scene"
    assert {sample_group("train", i, 1).kind for i in range(40)} == {"identity", "style"}


@pytest.mark.parametrize("kind", ["identity", "style", "scene"])
def test_group_targets_share_the_concept_and_captions_name_the_rest(kind):
    split = "held-out" if kind == "scene" else "held-in"
    group = make_group(split, kind, 3, 5)
    assert {k: getattr(group.target, k) for k in CONCEPT_ATTRIBUTES[kind]} == group.concept
    names = group.target.names()
    for attribute in PROMPT_ATTRIBUTES[kind]:
        assert names[attribute] in group.caption
    for attribute in CONCEPT_ATTRIBUTES[kind]:
        if attribute != "texture" or kind == "identity":
            assert names[attribute] not in group.caption.split() or attribute in PROMPT_ATTRIBUTES[kind]


def test_one_reference_does_not_determine_the_concept():
    """Most identity references hold other objects too, so one view leaves several candidate concepts."""
    ambiguous, total = 0, 0
    for index in range(40):
        group = make_group("train", "identity", index, 4)
        concept = (group.concept["shape"], group.concept["colour"], group.concept["pattern"])
        for scene in group.references:
            objects = _objects_in(scene)
            assert concept in objects
            ambiguous += len(set(objects)) > 1
            total += 1
        assert all(scene.view is not None for scene in group.references)
    assert 0.6 < ambiguous / total < 0.95


def test_hard_cases():
    group = make_group("held-in", "identity", 0, 8, hard="distractor")
    concept = (group.concept["shape"], group.concept["colour"], group.concept["pattern"])
    assert sum(concept not in _objects_in(scene) for scene in group.references) == 1
    group = make_group("held-in", "identity", 0, 4, hard="misaligned")
    positions = {scene.objects[[o[:3] for o in _objects_in(scene)].index(concept)].cx // 22
                 for scene in group.references}
    assert len(positions) == 2  # left and right columns of the corners


def test_world_folder_round_trip(tmp_path):
    settings = WorldSettings(pairs=6, crops=4, groups=5, train_references=3, held_in=4, held_out=6,
                             test_references=5, manifest_references=2)
    write_world(tmp_path / "w", settings, workers=1, progress=False)
    groups = load_manifest(tmp_path / "w" / MANIFEST)
    assert [len(g.references) for g in groups] == [2] * 10
    assert {g.split for g in groups} == {"held-in", "held-out"}
    assert all(len(g.references) == 5 for g in load_manifest(tmp_path / "w" / MANIFEST_ALL))
    lines = [json.loads(line) for line in (tmp_path / "w" / MANIFEST).read_text().splitlines()]
    again = sample_group(lines[0]["split"], 0, 5)
    assert lines[0]["shapes"] == json.loads(json.dumps(again.labels()))
    kinds = [load_records(tmp_path / "w" / "train" / f"stage{i}.json")[0].kind for i in (1, 2, 3)]
    assert kinds == ["single", "face", "group"]
    stamp = (tmp_path / "w" / "train" / "stage1.json").stat().st_mtime_ns
    write_world(tmp_path / "w", settings, workers=1, progress=False)  # complete: nothing rewritten
    assert (tmp_path / "w" / "train" / "stage1.json").stat().st_mtime_ns == stamp


def test_world_command_refuses_other_settings(tmp_path, capsys):
    args = ["shapes", "world", str(tmp_path), "--pairs", "2", "--crops", "2", "--groups", "2", "--held-in", "2",
            "--held-out", "3", "--test-references", "2", "--manifest-references", "1", "--workers", "1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args[:-2], "--workers", "1", "--seed", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]
    assert main(["shapes", "world", str(tmp_path / "x"), "--pairs", "0"]) == 1
    assert "pairs must be a positive integer" in capsys.readouterr().err
