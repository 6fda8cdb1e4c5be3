"""Shared fixtures: one tiny model folder per test session, built by the real factory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine it costs up to 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state(one_thread):
    """Each in-process training run builds its own Accelerator; accelerate keeps its state per process."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
