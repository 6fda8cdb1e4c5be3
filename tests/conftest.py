"""Shared fixtures: one tiny model folder per test session, built by the real factory."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

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


def hub_snapshot(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Lay ``files`` (name in the repository -> a local file or folder) out as the Hugging Face cache keeps a
    downloaded snapshot of ``repo``, so code under test finds it offline."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / ("a" * 40)
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy(source, target)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("a" * 40)
    return snapshot


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def references():
    """Three references of different sizes and aspect ratios."""
    return [random_image(64, 64, 1), random_image(120, 60, 2), random_image(50, 140, 3)]


# Tiny random weights push activations into float32's denormal range, where x86 CPUs run up to ~50x
# slower (a tiny 2-step generation: 0.2 s with denormals flushed, up to 10 s without). Real models rarely
# go there; the tests flush them so they measure our code, not that artifact. torch's flush setting is
# per thread and does not reach its worker threads, hence one thread.
@contextlib.contextmanager
def fast_cpu_maths() -> Iterator[None]:
    """Flush denormals to zero on one torch thread for the duration (torch's defaults: off, all cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread (on a busy 2-core machine it costs up to 10x)."""
    with fast_cpu_maths():
        yield


@pytest.fixture
def fresh_accelerate_state(one_thread):
    """Each in-process training run builds its own Accelerator; accelerate keeps its state per process."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
