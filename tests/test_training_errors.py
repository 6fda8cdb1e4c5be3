"""Bad input to ``train`` gives one clear ``error:`` line and a non-zero exit, before any training."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from easyref.cli import main
from easyref.training.commands import add_commands

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "t.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    path = tmp_path / "groups.json"
    path.write_text(json.dumps([{"image_file": ["a.png", "b.png"], "text": ["x"], "target": "t.png"}] * 2))
    return path


def run(capsys, *argv) -> tuple[int, str]:
    status = main(["train", *map(str, argv)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == (status != 0)
    return status, lines[0] if lines else ""


def common(tiny_model, data, output):
    return ["--model", tiny_model, "--data", data, "--output", output, "--resolution", 64, "--max-steps", 1,
            "--batch-size", 1, "--num-workers", 0, "--no-progress"]


def test_unknown_stage_is_a_usage_error(tiny_model, data, tmp_path, capsys):
    assert main(["train", "--stage", "pretrain", *map(str, common(tiny_model, data, tmp_path / "run"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "invalid choice: 'pretrain'" in err


@pytest.mark.parametrize(("stage", "previous"), [("single", "stage 1 (align)"), ("multi", "stage 2 (single)")])
def test_stage_without_init_says_which_adapter_it_needs(tiny_model, data, tmp_path, capsys, stage, previous):
    status, line = run(capsys, "--stage", stage, *common(tiny_model, data, tmp_path / "run"))
    assert status == 1 and previous in line and "--init" in line
    assert not (tmp_path / "run").exists()


def test_data_not_in_the_format_names_the_record(tiny_model, data, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_file": ["a.png"], "text": ["x"], "target": "t.png"},
                               {"image_file": ["a.png"], "face": [[0, 0, 9, 9]], "text": ["x"], "target": "t.png"}]))
    status, line = run(capsys, "--stage", "align", *common(tiny_model, bad, tmp_path / "run"))
    assert status == 1 and "record 1" in line and "got both" in line


def test_init_adapter_that_does_not_fit_the_model_names_the_shapes(tiny_model, data, tmp_path, capsys):
    adapter = tmp_path / "wrong-adapter"
    shutil.copytree(tiny_model / "adapter", adapter)
    state = load_file(adapter / "model.safetensors")
    state["projection.2.weight"] = torch.zeros(16, state["projection.2.weight"].shape[1])
    save_file(state, adapter / "model.safetensors")
    status, line = run(capsys, "--stage", "single", "--init", adapter, *common(tiny_model, data, tmp_path / "run"))
    assert status == 1 and "projection.2.weight" in line and "(16, 32)" in line and "(64, 32)" in line
    status, line = run(capsys, "--stage", "single", "--init", tmp_path, *common(tiny_model, data, tmp_path / "run2"))
    assert status == 1 and "is not an adapter folder" in line


def test_output_folder_holding_something_else_is_refused(tiny_model, data, tmp_path, capsys):
    other_run = tmp_path / "other-run"
    other_run.mkdir()
    (other_run / "run.json").write_text(json.dumps({"stage": "align", "seed": 1}))
    (other_run / "adapter").mkdir()  # it finished: something to protect
    status, line = run(capsys, "--stage", "single", "--init", tiny_model / "adapter",
                       *common(tiny_model, data, other_run))
    assert status == 1 and "holds a different run" in line and "stage: 'align' → 'single'" in line
    not_a_run = tmp_path / "photos"
    not_a_run.mkdir()
    (not_a_run / "cat.jpg").write_bytes(b"x")
    status, line = run(capsys, "--stage", "align", *common(tiny_model, data, not_a_run))
    assert status == 1 and "not an easyref training run" in line
    status, line = run(capsys, "--stage", "align", "--resume", tmp_path, *common(tiny_model, data, tmp_path / "r"))
    assert status == 1 and "not a complete checkpoint folder" in line
    status, line = run(capsys, "--stage", "single", "--init", tiny_model / "adapter", "--cond-image-size", 56,
                       *common(tiny_model, data, tmp_path / "r"))
    assert status == 1 and "--cond-image-size shape a new adapter" in line


def test_commands_attach_to_any_parser_and_import_nothing_heavy():
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "groups", "folder", "--output", "g.json"])
    assert callable(args.handler) and callable(args.func)
    args = parser.parse_args(["train", "--stage", "align", "--model", "m", "--data", "d.json", "--output", "o"])
    assert args.handler.__name__ == "run_train"
    code = "import sys, easyref.training.commands; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_help_is_wrapped_like_every_other_command(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "Train one stage of EasyRef's progressive training" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_an_output_folder_in_use_is_refused_and_a_lock_alone_is_not_a_foreign_file(tiny_model, data, tmp_path,
                                                                                   capsys):
    from easyref.files import LOCK_FILE, folder_lock

    output = tmp_path / "run"
    with folder_lock(output, "easyref train --stage align"):
        status, line = run(capsys, "--stage", "align", *common(tiny_model, data, output))
        assert status == 1 and f"{output} is in use by easyref train --stage align (pid" in line
        assert sorted(p.name for p in output.iterdir()) == [LOCK_FILE]  # nothing of the refused run
    # A stale lock (its process is gone) does not make the folder "not an easyref training run".
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (output / LOCK_FILE).write_text(json.dumps({"pid": child.pid, "host": __import__("socket").gethostname()}))
    status, _ = run(capsys, "--stage", "align", *common(tiny_model, data, output))
    assert status == 0 and (output / "adapter").is_dir() and not (output / LOCK_FILE).exists()


@pytest.mark.parametrize("damage", ["truncated weights", "no optimizer state", "bad training state"])
def test_a_damaged_latest_checkpoint_is_named_with_the_one_to_resume_from(tiny_model, data, tmp_path, capsys,
                                                                          damage):
    output = tmp_path / "run"
    args = [*common(tiny_model, data, output), "--save-steps", 1]
    args[args.index("--max-steps") + 1] = 2
    assert run(capsys, "--stage", "align", *args)[0] == 0
    latest = output / "checkpoint-2"
    if damage == "truncated weights":
        weights = latest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "no optimizer state":
        (latest / "optimizer.bin").unlink()
    else:
        (latest / "training_state.json").write_text("{")
    args[args.index("--max-steps") + 1] = 3
    status, line = run(capsys, "--stage", "align", "--resume", "latest", *args)
    assert status == 1 and f"checkpoint {latest} is damaged" in line
    assert line.endswith(f"resume from the one before it with --resume {output / 'checkpoint-1'}")
    assert run(capsys, "--stage", "align", "--resume", output / "checkpoint-1", *args)[0] == 0
