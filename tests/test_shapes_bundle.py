"""The bundled ShapesWorld model, judged: it follows a shipped example group, and other references change it.

Runs only where the package carries the bundle (``easyref shapes reproduce`` makes it; it is committed
once it meets its targets). The tiny random model covers the plumbing everywhere else.
"""

from __future__ import annotations

import numpy as np
import pytest

from easyref.hub import bundled_folder
from easyref.shapes.examples import example_group, example_images

BUNDLE = bundled_folder("shapesworld")
pytestmark = pytest.mark.skipif(not (BUNDLE / "adapter" / "config.json").is_file(),
                                reason="this checkout does not carry the bundled ShapesWorld model")
SEEDS = 4
# Below what the model measures on this example (the first exported model: 0.5 over 8 seeds), so that
# another platform's rounding cannot flip it; raise it with the bundle that ships.
MIN_CONCEPT = 0.25


@pytest.fixture(scope="module")
def bundle():
    from easyref.pipeline import EasyRefPipeline
    from easyref.shapes.judge import ShapesJudge

    return EasyRefPipeline.from_pretrained("shapesworld", device="cpu"), ShapesJudge.from_pretrained(BUNDLE / "judge")


def _generate(pipe, group, prompt: str) -> list[np.ndarray]:
    images = pipe(example_images(group), prompt, seed=0, num_images=SEEDS, num_inference_steps=20,
                  progress=False).images
    return [np.asarray(image.convert("RGB")) for image in images]


def test_the_bundled_model_gets_a_held_in_concept_right(bundle):
    from easyref.shapes.judge import score_images

    pipe, judge = bundle
    group = example_group("held-in-style")
    scores = score_images(judge, _generate(pipe, group, group.caption), group.concept, group.prompt)
    assert np.mean([s["concept_ok"] for s in scores]) >= MIN_CONCEPT


def test_other_references_change_the_images(bundle):
    pipe, _ = bundle
    style, identity = example_group("held-in-style"), example_group("held-in-identity")
    own = _generate(pipe, style, style.caption)
    other = _generate(pipe, identity, style.caption)  # same prompt and seeds, other references
    differences = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(own, other, strict=True)]
    assert min(differences) > 5.0
