"""The bundled ShapesWorld model, judged: its references carry the concept, and other references change it.

The package ships the bundle (``easyref shapes reproduce`` makes it); a checkout without it skips these
tests. The tiny random model covers the plumbing everywhere else.
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


@pytest.fixture(scope="module")
def bundle():
    from easyref.pipeline import EasyRefPipeline
    from easyref.shapes.judge import ShapesJudge

    return EasyRefPipeline.from_pretrained("shapesworld", device="cpu"), ShapesJudge.from_pretrained(BUNDLE / "judge")


def _generate(pipe, group, prompt: str, references=None) -> list[np.ndarray]:
    references = example_images(group) if references is None else references
    images = pipe(references, prompt, seed=0, num_images=SEEDS, num_inference_steps=20, progress=False).images
    return [np.asarray(image.convert("RGB")) for image in images]


def test_the_judge_finds_more_of_a_groups_concept_with_its_own_references(bundle):
    """Over the shipped examples, the share of the group's concept attributes the judge reads right is
    higher when the model sees the group's references than another group's (same caption and seeds):
    the references, not the caption, carry the concept."""
    from easyref.shapes.examples import example_names
    from easyref.shapes.judge import score_images

    pipe, judge = bundle
    names = example_names()
    own, other = [], []
    for index, name in enumerate(names):
        group, swapped = example_group(name), example_group(names[(index + 1) % len(names)])
        for shares, references in ((own, None), (other, example_images(swapped))):
            scores = score_images(judge, _generate(pipe, group, group.caption, references), group.concept,
                                  group.prompt)
            shares.append(np.mean([[score[f"{attribute}_ok"] for attribute in group.concept] for score in scores]))
    assert np.mean(own) > np.mean(other)


def test_other_references_change_the_images(bundle):
    pipe, _ = bundle
    style, identity = example_group("held-in-style"), example_group("held-in-identity")
    own = _generate(pipe, style, style.caption)
    other = _generate(pipe, style, style.caption, example_images(identity))  # same prompt and seeds
    differences = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(own, other, strict=True)]
    assert min(differences) > 5.0
