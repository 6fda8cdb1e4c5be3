"""Two processes under ``accelerate launch``: each stage, and a killed run resumed to the same weights.

``accelerate launch --num_processes 2 --cpu`` starts a single process in accelerate 1.x (its CPU
launcher expects ``mpirun`` for more); ``--multi_gpu`` starts two through torch's elastic launcher,
and ``ACCELERATE_USE_CPU`` makes them a CPU (gloo) process group.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

MODULE = "easyref"  # the module `accelerate launch -m` runs
TWO_PROCESSES = ["--multi_gpu", "--num_processes", "2"]
CPU_ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# A safety net against a hung run, not a speed test: a loaded 2-core machine may need minutes per stage.
TIMEOUT = 1200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(*train_args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *TWO_PROCESSES, "--mixed_precision", "no",
            "--main_process_port", str(free_port()), "-m", MODULE, "train", *map(str, train_args)]


def kill_all(processes) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(processes), timeout=30)


def launch(*train_args, check: bool = True) -> tuple[int, str]:
    """Run the launcher to its end; return (exit status, output).

    Output goes to a file, not a pipe: a leftover grandchild holding a pipe open must not make the
    test wait for it. Every process seen under the launcher (torch's launcher starts its workers in
    new sessions) is killed afterwards, so no run outlives its test.
    """
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(launch_command(*train_args), env={**os.environ, **CPU_ENV}, stdout=log,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        root, seen, deadline = psutil.Process(process.pid), set(), time.monotonic() + TIMEOUT
        try:
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    seen.update(root.children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
                time.sleep(0.5)
            timed_out = process.poll() is None
        finally:
            kill_all([root, *seen] if process.poll() is None else seen)
            process.wait()
        log.seek(0)
        output = log.read()
    if timed_out:
        pytest.fail(f"training did not finish in {TIMEOUT} s:\n{output[-3000:]}")
    if check:
        assert process.returncode == 0, output[-3000:]
    return process.returncode, output


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch-data")
    rng = np.random.default_rng(0)
    groups, pairs, faces = [], [], []
    for g in range(2):
        names = []
        for i in range(3):
            name = f"g{g}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (64 + 8 * i, 72, 3), dtype=np.uint8)).save(root / name)
            names.append(name)
        for target in names:
            groups.append({"image_file": [n for n in names if n != target], "text": [f"group {g}"], "target": target})
            pairs.append({"image_file": [target], "text": [f"photo {g}"], "target": target})
            faces.append({"face": [[8, 8, 40, 48, 0.9]], "text": [f"face {g}"], "target": target})
    for name, records in (("groups", groups), ("pairs", pairs), ("faces", faces)):
        (root / f"{name}.json").write_text(json.dumps(records))
    return root


def common(tiny_model, data, name, output):
    return ["--model", tiny_model, "--data", data / f"{name}.json", "--output", output, "--resolution", 64,
            "--batch-size", 1, "--num-workers", 0, "--log-steps", 1, "--no-progress"]


@pytest.fixture(scope="module")
def runs(tiny_model, data, tmp_path_factory):
    """Stage 1 → 2 → 3, each with two processes; stage 3 runs 4 steps with checkpoints every 2."""
    root = tmp_path_factory.mktemp("launch-runs")
    out = {stage: root / stage for stage in ("align", "single", "multi")}
    launch("--stage", "align", "--cond-image-size", 56, "--max-steps", 2, "--save-steps", 2,
           *common(tiny_model, data, "pairs", out["align"]))
    launch("--stage", "single", "--init", out["align"] / "adapter", "--lora-rank", 4, "--max-steps", 2,
           "--save-steps", 2, *common(tiny_model, data, "faces", out["single"]))
    launch(*multi_args(tiny_model, data, out["single"] / "adapter", out["multi"]))
    return out


def multi_args(tiny_model, data, init, output):
    return ["--stage", "multi", "--init", init, "--max-steps", 4, "--save-steps", 2,
            "--gradient-accumulation-steps", 2, *common(tiny_model, data, "groups", output)]


def test_each_stage_on_two_processes_writes_a_loadable_adapter(runs, tiny_model):
    from easyref.pipeline import EasyRefPipeline

    for stage, output in runs.items():
        assert json.loads((output / "run.json").read_text())["num_processes"] == 2
        checkpoint = sorted(output.glob("checkpoint-*"))[-1]
        assert {f"random_states_{rank}.pkl" for rank in (0, 1)} <= {p.name for p in checkpoint.iterdir()}
        files = {p.name for p in (output / "adapter").iterdir()}
        assert files == ({"config.json", "model.safetensors"} if stage == "align"
                         else {"config.json", "model.safetensors", "mllm.safetensors"})
        pipe = EasyRefPipeline.from_pretrained(base=tiny_model / "base", mllm=tiny_model / "mllm",
                                               adapter=output / "adapter", device="cpu", torch_dtype="float32")
        assert pipe.config.lora_rank == (None if stage == "align" else 4)
        with torch.no_grad():
            tokens = pipe.encode_references([Image.new("RGB", (64, 64), "red")], "a photo")
        assert tokens.shape == (1, pipe.config.num_reference_tokens, pipe.config.cross_attention_dim)
    before = load_file(runs["single"] / "adapter" / "mllm.safetensors")
    after = load_file(runs["multi"] / "adapter" / "mllm.safetensors")
    assert any(not torch.equal(before[key], after[key]) for key in before)  # stage 3 trained the MLLM


def test_a_killed_run_resumes_to_the_same_weights(runs, tiny_model, data, tmp_path):
    """Kill every process of a 2-process stage-3 run after its step-2 checkpoint, resume it with
    ``--resume latest``, and compare with the uninterrupted run of the same settings."""
    output = tmp_path / "killed"
    args = multi_args(tiny_model, data, runs["single"] / "adapter", output)
    log = tmp_path / "killed.log"
    with open(log, "w") as handle:
        launcher = subprocess.Popen(launch_command(*args, "--pause-after-steps", 2), env={**os.environ, **CPU_ENV},
                                    stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((output / "checkpoint-2" / "training_state.json").is_file() and "paused" in log.read_text()):
            assert launcher.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached its step-2 checkpoint"
            time.sleep(0.5)
    finally:  # every process at once, as a crash or a preempted job would
        root = psutil.Process(launcher.pid)
        kill_all([root, *root.children(recursive=True)])
        launcher.wait()
    assert not (output / "adapter").exists() and not (output / "checkpoint-4").exists()

    _, err = launch(*args, "--resume", "latest")
    assert f"resumed from {output / 'checkpoint-2'} at step 2" in err
    for name in ("model.safetensors", "mllm.safetensors"):
        expected = load_file(runs["multi"] / "adapter" / name)
        resumed = load_file(output / "adapter" / name)
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[key], resumed[key]) for key in expected), name
    losses = [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()]
    expected_losses = [json.loads(line)["loss"] for line in (runs["multi"] / "log.jsonl").read_text().splitlines()]
    assert losses == expected_losses


def test_a_failing_launched_run_ends_with_its_one_line_error(tiny_model, data, tmp_path):
    """Too little data for --batch-size x processes: the launcher's closing summary names easyref's
    message (not a pointer to a traceback guide), and nothing is written."""
    status, output = launch("--stage", "align", "--cond-image-size", 56, "--max-steps", 2,
                            *common(tiny_model, data, "pairs", tmp_path / "run"), "--batch-size", 8, check=False)
    expected = f"error: {data / 'pairs.json'} has 6 records; one step needs at least 16 (--batch-size x processes)"
    assert status != 0
    assert expected in "\n".join(output.splitlines()[-3:])  # the summary's root cause, above its closing rule
    assert not (tmp_path / "run" / "adapter").exists()
