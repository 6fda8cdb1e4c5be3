"""``easyref shapes reproduce --quick --part-one``: the world and every pretrained model in one run that an
interruption does not waste. (Part two's steps have their own tests in test_shapes_experiments.py; a whole
``--quick`` run takes minutes, too long for the suite.)"""

from __future__ import annotations

import json
import shutil

import pytest

from easyref.shapes.reproduce import DONE, PRETRAIN_ORDER, QUICK_STEPS, SUMMARY, reproduce

from conftest import fast_cpu_maths

PRETRAINERS = {"judge": "easyref.shapes.judge.pretrain_judge", "clip": "easyref.shapes.clip.pretrain_clip",
               "dino": "easyref.shapes.dino.pretrain_dino", "base": "easyref.shapes.base.pretrain_base",
               "mllm": "easyref.shapes.mllm.pretrain_mllm"}


def _as_json(value):
    """What a value reads back as from a JSON file (tuples become lists)."""
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output = tmp_path_factory.mktemp("reproduce") / "out"
    with fast_cpu_maths():
        return output, _as_json(reproduce(output, quick=True, progress=False, experiments=False))


def _refuse_training(monkeypatch, allowed=()):
    """Make every pretraining function except ``allowed`` fail if called; return the names that were called."""
    import importlib

    called = []
    for name, target in PRETRAINERS.items():
        module, function = target.rsplit(".", 1)
        original = getattr(importlib.import_module(module), function)

        def fake(*args, _name=name, _original=original, **kwargs):
            called.append(_name)
            if _name not in allowed:
                raise AssertionError(f"{_name} was trained again")
            return _original(*args, **kwargs)

        monkeypatch.setattr(f"{module}.{function}", fake)
    return called


def test_part_one_writes_the_world_and_every_model_with_its_numbers(run):
    output, summary = run
    assert summary["quick"] is True and "experiments" not in summary
    assert list(summary["pretrained"]) == list(PRETRAIN_ORDER)
    for name in PRETRAIN_ORDER:
        done = json.loads((output / "pretrained" / "work" / name / DONE).read_text())
        assert done == summary["pretrained"][name], name
    assert summary["pretrained"]["clip"]["steps"] == QUICK_STEPS
    for folder in ("judge", "clip", "dino", "mllm"):
        assert (output / "pretrained" / folder / "config.json").is_file(), folder
    assert (output / "pretrained" / "base" / "model_index.json").is_file()
    assert json.loads((output / SUMMARY).read_text()) == summary
    assert (output / "world" / "world.json").is_file() and (output / "shapesworld-groups.png").is_file()


def test_a_rerun_trains_nothing_and_gives_the_same_numbers(run, monkeypatch):
    output, summary = run
    called = _refuse_training(monkeypatch)
    again = reproduce(output, quick=True, progress=False, experiments=False)
    assert called == []
    assert _as_json(again) == summary


def test_an_interrupted_run_redoes_only_the_unfinished_model(run, monkeypatch, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(run[0], output)  # the shared run stays finished for the other tests
    (output / "pretrained" / "work" / "mllm" / DONE).unlink()  # as if the run had stopped during the MLLM
    called = _refuse_training(monkeypatch, allowed=("mllm",))
    with fast_cpu_maths():
        summary = reproduce(output, quick=True, progress=False, experiments=False)
    assert called == ["mllm"]
    assert (output / "pretrained" / "work" / "mllm" / DONE).is_file()
    assert summary["pretrained"]["mllm"]["steps"] == QUICK_STEPS
