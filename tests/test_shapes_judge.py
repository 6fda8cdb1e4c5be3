"""ShapesWorld's judge: it learns to read fresh renders on a tiny budget, loads back to the same predictions,
and its metrics match a hand computation (unsure right answers count as wrong)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from easyref.bench.metrics import bootstrap_interval
from easyref.errors import InvalidArgumentError, ModelFormatError
from easyref.shapes import judge as shapes_judge
from easyref.shapes.judge import Judgement, ShapesJudge, score_judgement, summarize_scores
from easyref.shapes.world import ATTRIBUTES, clean_scene, random_attributes, render
from easyref.training.steps import step_rng

from conftest import fast_cpu_maths

SEED = 5
# Attributes a CNN picks up in its first hundred steps; shape takes a few hundred more (see FULL_STEPS).
EASY = {"colour": 6, "position": 9, "background": 6, "texture": 3}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A judge trained for a few seconds and published as a pretrained set holds it."""
    folder = tmp_path_factory.mktemp("shapes-pretrained")
    with fast_cpu_maths():
        summary = shapes_judge.pretrain_judge(folder / "judge", steps=100, seed=SEED, progress=False, batch_size=32,
                                              eval_positives=100, eval_negatives=20)
    return folder / "judge", summary


def _well_above_chance(values: int) -> float:
    """Halfway from guessing (1 / values) to perfect."""
    return 0.5 + 0.5 / values


def _scenes(count: int, seed: int = 0) -> tuple[list, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = [random_attributes(rng) for _ in range(count)]
    return truth, np.stack([render(clean_scene(a, rng)) for a in truth])


def test_short_training_reads_fresh_renders_well_above_chance(trained):
    folder, summary = trained
    assert summary["final_loss"] < 0.6 * summary["first_loss"]
    assert json.loads((folder / shapes_judge.ACCURACY_FILE).read_text()) == json.loads(json.dumps(summary))
    for condition in ("clean", "augmented"):
        for split in ("train", "held_out"):
            accuracy = summary["accuracy"][condition][split]
            assert set(accuracy) == set(ATTRIBUTES)
            for name, values in EASY.items():
                assert accuracy[name] > _well_above_chance(values), (condition, split, name, accuracy[name])
    assert summary["rejected"]["noise"] > 0.9
    # Scenes never seen in training (another seed), scored through the public API.
    truth, images = _scenes(48, seed=99)
    with fast_cpu_maths():
        judge = ShapesJudge.from_pretrained(folder)
        judgement = judge.classify(images)
    for name, values in EASY.items():
        assert judgement.correct(name, np.array([getattr(a, name) for a in truth])).mean() > _well_above_chance(values)


def test_save_load_round_trip_gives_identical_predictions(trained):
    folder, _ = trained
    _, images = _scenes(16)
    with fast_cpu_maths():
        loaded = ShapesJudge.from_pretrained(folder)
        first = loaded.classify(images)
        again = ShapesJudge.from_pretrained(folder).classify([Image.fromarray(image) for image in images])
    assert not loaded.training
    np.testing.assert_array_equal(first.clean, again.clean)
    for name in ATTRIBUTES:
        np.testing.assert_array_equal(first.attributes[name][0], again.attributes[name][0])
        np.testing.assert_array_equal(first.attributes[name][1], again.attributes[name][1])
    assert loaded.config.attribute_values == {name: list(values) for name, values in ATTRIBUTES.items()}


def test_batches_are_a_pure_function_of_seed_and_step():
    first = shapes_judge._batch(step_rng(SEED, 7), 12)
    again = shapes_judge._batch(step_rng(SEED, 7), 12)
    other = shapes_judge._batch(step_rng(SEED, 8), 12)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(first[0].numpy(), other[0].numpy())
    pixels, labels, clean = first
    assert pixels.shape == (12, 3, 64, 64) and 0 <= pixels.min() and pixels.max() <= 1
    # Negatives name no attribute; clean scenes name all of them.
    assert ((labels >= 0).all(dim=1) == (clean == 1)).all() and ((labels < 0).all(dim=1) == (clean == 0)).all()


def _judgement(labels: dict[str, list[int]], label_probability: float = 0.9, clean: float = 0.9) -> Judgement:
    """Predictions as given, each label with ``label_probability`` and the rest spread evenly."""
    n = len(next(iter(labels.values())))
    attributes = {}
    for name, values in ATTRIBUTES.items():
        predicted = np.array(labels.get(name, [0] * n))
        probabilities = np.full((n, len(values)), (1 - label_probability) / (len(values) - 1))
        probabilities[np.arange(n), predicted] = label_probability
        attributes[name] = (predicted, probabilities)
    return Judgement(attributes, np.full(n, clean), attribute_threshold=0.6, clean_threshold=0.5)


CONCEPT = {"shape": 4, "colour": 0, "pattern": 1}
PROMPT = {"size": 1, "position": 2, "background": 3, "texture": 0}


def test_metrics_match_a_hand_computation():
    # Image 0 is a perfect oracle; 1 gets the colour wrong; 2 the position; 3 both; 4 everything.
    labels = {"shape": [4, 4, 4, 4, 0], "colour": [0, 2, 0, 2, 1], "pattern": [1, 1, 1, 1, 0],
              "size": [1, 1, 1, 1, 0], "position": [2, 2, 5, 5, 0], "background": [3, 3, 3, 3, 0],
              "texture": [0, 0, 0, 0, 1]}
    scores = score_judgement(_judgement(labels), CONCEPT, PROMPT)
    concept = [True, False, True, False, False]
    prompt = [True, True, False, False, False]
    assert [s["concept_ok"] for s in scores] == concept
    assert [s["prompt_ok"] for s in scores] == prompt
    assert [s["both"] for s in scores] == [c and p for c, p in zip(concept, prompt, strict=True)]
    assert [s["colour_ok"] for s in scores] == [True, False, True, False, False]
    assert [s["position_ok"] for s in scores] == [True, True, False, False, False]
    assert all(s["shape_ok"] for s in scores[:4]) and not scores[4]["shape_ok"]
    assert set(scores[0]) == {"concept_ok", "prompt_ok", "both", *(f"{name}_ok" for name in ATTRIBUTES)}
    # Only what the concept and prompt name is scored.
    assert set(score_judgement(_judgement(labels), {"shape": 4}, {})[0]) == {"concept_ok", "prompt_ok", "both",
                                                                              "shape_ok"}


def test_unsure_predictions_count_as_wrong():
    right = {name: [value] for name, value in {**CONCEPT, **PROMPT}.items()}
    sure = score_judgement(_judgement(right), CONCEPT, PROMPT)[0]
    unsure_label = score_judgement(_judgement(right, label_probability=0.55), CONCEPT, PROMPT)[0]
    unclean = score_judgement(_judgement(right, clean=0.4), CONCEPT, PROMPT)[0]
    assert all(sure.values())
    assert not any(unsure_label.values())
    assert not any(unclean.values())
    # At the thresholds themselves the judge counts as sure.
    assert all(score_judgement(_judgement(right, label_probability=0.6, clean=0.5), CONCEPT, PROMPT)[0].values())


def test_summary_averages_groups_first_and_bootstraps_over_groups():
    rows = [{"group_id": "a", "concept_ok": True, "prompt_ok": True, "both": True, "shape_ok": True},
            {"group_id": "a", "concept_ok": False, "prompt_ok": True, "both": False, "shape_ok": False},
            {"group_id": "b", "concept_ok": True, "prompt_ok": False, "both": False},
            {"group_id": "c", "concept_ok": False, "prompt_ok": False, "both": False}]
    summary = summarize_scores(rows, seed=1)
    assert summary["concept_ok"]["mean"] == pytest.approx((0.5 + 1 + 0) / 3)   # not the image mean, 0.5
    assert summary["prompt_ok"]["mean"] == pytest.approx((1 + 0 + 0) / 3)
    assert summary["both"]["mean"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert summary["shape_ok"] == {"mean": 0.5, "low": 0.5, "high": 0.5, "groups": 1}
    assert set(summary) == {"concept_ok", "prompt_ok", "both", "shape_ok"}
    low, high = bootstrap_interval(np.array([0.5, 1.0, 0.0]), seed=1)
    assert (summary["concept_ok"]["low"], summary["concept_ok"]["high"]) == (low[0], high[0])
    assert summary["concept_ok"]["groups"] == 3


def test_bad_inputs_are_refused():
    right = _judgement({"shape": [1]})
    with pytest.raises(InvalidArgumentError, match="different values of shape"):
        score_judgement(right, {"shape": 1}, {"shape": 2})
    with pytest.raises(InvalidArgumentError, match="unknown attribute"):
        score_judgement(right, {"hue": 1}, {})
    with pytest.raises(InvalidArgumentError, match="index below 6"):
        score_judgement(right, {"shape": 6}, {})
    judge = ShapesJudge()
    with pytest.raises(InvalidArgumentError, match="uint8"):
        judge.classify([np.zeros((64, 64, 3), dtype=np.float32)])
    with pytest.raises(InvalidArgumentError, match="no images"):
        judge.classify([])
    with pytest.raises(ModelFormatError, match="different attributes"):
        ShapesJudge(attribute_values={"shape": ["circle"]})
    with pytest.raises(InvalidArgumentError, match="between 0 and 1"):
        ShapesJudge(clean_threshold=1.5)


def test_files_pil_images_and_arrays_read_the_same_and_other_sizes_are_area_resized(tmp_path):
    _, images = _scenes(2)
    Image.fromarray(images[0]).save(tmp_path / "scene.png")
    mixed = [tmp_path / "scene.png", Image.fromarray(images[1])]
    np.testing.assert_array_equal(shapes_judge.images_to_tensor(mixed), shapes_judge.images_to_tensor(images))
    big = [np.asarray(Image.fromarray(image).resize((128, 128), Image.Resampling.NEAREST)) for image in images]
    np.testing.assert_array_equal(shapes_judge.images_to_tensor(big), shapes_judge.images_to_tensor(images))
