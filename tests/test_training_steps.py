"""The shared pretraining loop: deterministic batches, exact resume, clear failures."""

from __future__ import annotations

import json

import pytest
import torch

from easyref.errors import InvalidArgumentError
from easyref.training.steps import LoopSettings, step_generator, step_rng, train


def _problem(seed: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    target = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def step_loss(step: int) -> torch.Tensor:
        x = torch.randn(16, 4, generator=step_generator(seed, step))
        return ((model(x) - x @ target.T) ** 2).mean()

    return model, step_loss


def test_batches_depend_only_on_seed_and_step():
    assert step_rng(1, 5).integers(1000, size=4).tolist() == step_rng(1, 5).integers(1000, size=4).tolist()
    assert step_rng(1, 5).random() != step_rng(1, 6).random()
    a = torch.randn(3, generator=step_generator(2, 9))
    assert torch.equal(a, torch.randn(3, generator=step_generator(2, 9)))


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, fresh_accelerate_state):
    settings = LoopSettings(steps=30, learning_rate=0.3, save_every=10, log_every=2)
    model, step_loss = _problem(0)
    summary = train("whole", model, step_loss, settings, tmp_path / "whole", progress=False)
    assert summary["final_loss"] < 0.2 * summary["first_loss"]

    class Killed(Exception):
        pass

    part, part_loss = _problem(0)

    def dies_at_17(step: int) -> torch.Tensor:
        if step == 17:
            raise Killed
        return part_loss(step)

    with pytest.raises(Killed):
        train("part", part, dies_at_17, settings, tmp_path / "part", progress=False)
    fresh, fresh_loss = _problem(0)  # a new process: fresh weights, resumed from the checkpoint at step 10
    train("part", fresh, fresh_loss, settings, tmp_path / "part", progress=False)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    logs = [[json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("whole", "part")]
    assert logs[0] == logs[1]


def test_bad_settings_and_diverging_loss(tmp_path, fresh_accelerate_state):
    with pytest.raises(InvalidArgumentError, match="steps must be at least 1"):
        LoopSettings(steps=0, learning_rate=1.0)
    model, _ = _problem(0)
    with pytest.raises(FloatingPointError, match="loss became nan at step 0"):
        train("nan", model, lambda step: model.weight.sum() * float("nan"), LoopSettings(steps=3, learning_rate=1.0),
              tmp_path, progress=False)
