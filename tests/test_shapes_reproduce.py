"""``easyref shapes reproduce --quick --part-one``: the world and every pretrained model in one run that an
interruption does not waste. (Part two's steps have their own tests in test_shapes_experiments.py; a whole
``--quick`` run takes minutes, too long for the suite.)"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from bench_helpers import fast_cpu_env
from easyref.cli import main
from easyref.shapes import reproduce as reproduce_module
from easyref.shapes.reproduce import DONE, PRETRAIN_ORDER, QUICK_STEPS, SUMMARY, TIMINGS, reproduce


def _as_json(value):
    """What a value reads back as from a JSON file (tuples become lists)."""
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module", autouse=True)
def fast_subprocesses(tmp_path_factory):
    """Every pretraining command with conftest's fast CPU maths (flushed denormals), as in-process tests get."""
    env = fast_cpu_env(tmp_path_factory.mktemp("fast-cpu"), dict(os.environ))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", env["PYTHONPATH"])
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output = tmp_path_factory.mktemp("reproduce") / "out"
    return output, _as_json(reproduce(output, quick=True, progress=False, experiments=False, jobs=2))


def _refuse_training(monkeypatch, allowed=()):
    """Make every pretraining command except those of ``allowed`` fail; return the models it was run for."""
    called = []
    original = reproduce_module.command

    def fake(args):
        args = [str(a) for a in args]
        assert args[:2] == ["shapes", "pretrain"] and "--quick" in args
        called.append(args[2])
        if args[2] not in allowed:
            raise AssertionError(f"{args[2]} was trained again")
        original(args)

    monkeypatch.setattr(reproduce_module, "command", fake)
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
    for name in PRETRAIN_ORDER:  # each model trained by its own command, its output kept
        log = (output / "logs" / f"pretrain-{name}.log").read_text()
        assert f"shapes pretrain {name} {output / 'pretrained'} --seed 0 --quick" in log.splitlines()[0]
    (first,) = json.loads((output / TIMINGS).read_text())["runs"]
    assert first["jobs"] == 2 and set(first["steps"]) == {f"pretrain {name}" for name in PRETRAIN_ORDER}


def test_a_rerun_trains_nothing_and_gives_the_same_numbers(run, monkeypatch):
    output, summary = run
    called = _refuse_training(monkeypatch)
    again = reproduce(output, quick=True, progress=False, experiments=False, jobs=2)
    assert called == []
    assert _as_json(again) == summary
    assert json.loads((output / TIMINGS).read_text())["runs"][-1]["steps"] == {}


def test_an_interrupted_run_redoes_only_the_unfinished_model(run, monkeypatch, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(run[0], output)  # the shared run stays finished for the other tests
    (output / "pretrained" / "work" / "mllm" / DONE).unlink()  # as if the run had stopped during the MLLM
    called = _refuse_training(monkeypatch, allowed=("mllm",))
    summary = reproduce(output, quick=True, progress=False, experiments=False, jobs=2)
    assert called == ["mllm"]
    assert (output / "pretrained" / "work" / "mllm" / DONE).is_file()
    assert summary["pretrained"]["mllm"]["steps"] == QUICK_STEPS


@pytest.mark.parametrize(("args", "message"), [
    (["shapes", "pretrain", "clip", "OUT", "--quick", "--steps", "3"], "--quick sets its own number of steps"),
    (["shapes", "reproduce", "OUT", "--jobs", "0"], "--jobs must be at least 1, got 0"),
])
def test_contradictory_or_impossible_options_are_refused(args, message, tmp_path, capsys):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
