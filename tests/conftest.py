"""Shared fixtures: one tiny model folder per test session, built by the real factory."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from easyref.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    from easyref.pipeline import EasyRefPipeline

    return EasyRefPipeline.from_pretrained(tiny_model, device="cpu", torch_dtype="float32")


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def references():
    """Three references of different sizes and aspect ratios."""
    return [random_image(64, 64, 1), random_image(120, 60, 2), random_image(50, 140, 3)]
