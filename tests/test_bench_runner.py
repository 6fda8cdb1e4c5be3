"""``bench run`` / ``bench scaling``: seeds, resuming, crash safety, exact-once sharding, the CLI."""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench_helpers import fast_cpu_env, write_manifest
from easyref.bench import runs
from easyref.bench.generation_commands import add_run_commands
from easyref.bench.manifest import BenchFormatError, Group, load_manifest
from easyref.bench.methods import Method
from easyref.bench.runner import group_seed, run_benchmark, shard
from easyref.bench.scaling import CSV_NAME, run_scaling
from easyref.errors import EasyRefError

# How the tests invoke the generation commands.
BENCH = ["-m", "easyref", "bench"]
FAST = ["--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "float32"]


class Fake(Method):
    """A method that paints each image from its seed, counts calls and can fail on one group."""

    name = "fake"

    def __init__(self, fail_on: str | None = None, tunes: bool = False, colour: int = 0) -> None:
        self.fail_on = fail_on
        self.tunes = tunes
        self.colour = colour
        self.generated: list[str] = []
        self.prepared: list[str] = []

    def settings(self) -> dict:
        return {"colour": self.colour}

    def prepare(self, group: Group, seed: int) -> None:
        self.prepared.append(group.id)

    def generate(self, group: Group, seed: int, num_images: int) -> list[Image.Image]:
        if group.id == self.fail_on:
            raise RuntimeError(f"boom in {group.id}")
        self.generated.append(group.id)
        return [Image.new("RGB", (8, 8), (seed % 256, index, self.colour)) for index in range(num_images)]


@pytest.fixture
def bench(tmp_path):
    return write_manifest(tmp_path / "bench", [1, 2, 3, 4, 2, 1])


def _files(run: Path) -> dict[str, int]:
    """Every file under a run's images/ with its modification time (hidden temporary folders included)."""
    return {str(path.relative_to(run)): path.stat().st_mtime_ns for path in (run / runs.IMAGES).rglob("*")}


def test_group_seed_depends_only_on_base_seed_and_id():
    assert group_seed(0, "g1") == group_seed(0, "g1")
    seeds = {group_seed(base, gid) for base in (0, 1) for gid in ("g0", "g1", "g2")}
    assert len(seeds) == 6
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_shards_partition_the_groups(bench):
    groups = load_manifest(bench)
    for count in (1, 2, 4, 8):
        shards = [shard(list(reversed(groups)), index, count) for index in range(count)]
        ids = [group.id for part in shards for group in part]
        assert sorted(ids) == sorted(group.id for group in groups)  # each exactly once, whatever the order


def test_sidecars_describe_each_image(bench, tmp_path):
    run = run_benchmark(bench, Fake(tunes=True), tmp_path / "run", images_per_group=2, seed=3, limit=4)
    images = runs.read_images(run)
    assert [(image.group_id, image.sidecar["index"]) for image in images] == [
        (gid, k) for gid in ("g0", "g1", "g2", "g3") for k in (0, 1)]  # --limit: the first groups by id
    sidecar = images[3].sidecar
    assert sidecar["method"] == "fake" and sidecar["seed"] == group_seed(3, "g1")
    assert sidecar["num_references"] == 2 and sidecar["seconds_per_image"] >= 0 and sidecar["tuning_seconds"] >= 0
    assert sidecar["settings"] == {"colour": 0, "images_per_group": 2, "base_seed": 3}
    assert (sidecar["process_index"], sidecar["num_processes"]) == (0, 1)
    assert runs.read_run_info(run)["settings"] == sidecar["settings"]
    assert "tuning_seconds" not in runs.read_images(run_benchmark(bench, Fake(), tmp_path / "plain"))[0].sidecar


def test_resume_regenerates_nothing(bench, tmp_path):
    run = run_benchmark(bench, Fake(), tmp_path / "run")
    before = _files(run)
    again = Fake()
    run_benchmark(bench, again, tmp_path / "run")
    assert again.generated == [] and again.prepared == []
    assert _files(run) == before


@pytest.mark.parametrize("where", ["generate", "write"])
def test_a_crash_mid_group_leaves_only_finished_groups(bench, tmp_path, monkeypatch, where):
    output = tmp_path / "run"
    if where == "generate":
        method = Fake(fail_on="g1")
    else:  # the second image of the second group fails to save, after its first was written
        method = Fake()
        saves = []
        original = Image.Image.save

        def flaky_save(self, *args, **kwargs):
            saves.append(1)
            if len(saves) == 4:
                raise OSError("disk full")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises((RuntimeError, OSError)):
        run_benchmark(bench, method, output, images_per_group=2)
    monkeypatch.undo()
    assert sorted(path.name for path in (output / runs.IMAGES).iterdir()) == ["g0"]  # no temp folder either
    finished = _files(output)
    retry = Fake()
    run_benchmark(bench, retry, output, images_per_group=2)
    assert retry.generated == ["g1", "g2", "g3", "g4", "g5"]
    assert len(runs.read_images(output)) == 12
    assert all(_files(output)[name] == mtime for name, mtime in finished.items())


def test_a_run_folder_belongs_to_one_benchmark_method_and_settings(bench, tmp_path):
    run_benchmark(bench, Fake(), tmp_path / "run", limit=1)
    other = write_manifest(tmp_path / "other", [2, 2])
    with pytest.raises(BenchFormatError, match="different benchmark"):
        run_benchmark(other, Fake(), tmp_path / "run")
    renamed = Fake()
    renamed.name = "another"
    with pytest.raises(BenchFormatError, match="method"):
        run_benchmark(bench, renamed, tmp_path / "run")
    with pytest.raises(BenchFormatError, match="different settings.*colour"):
        run_benchmark(bench, Fake(colour=9), tmp_path / "run")
    with pytest.raises(BenchFormatError, match="different settings.*base_seed"):
        run_benchmark(bench, Fake(), tmp_path / "run", seed=1)


def test_scaling_uses_the_first_references_per_size(bench, tmp_path):
    csv_path = run_scaling(bench, Fake(), tmp_path / "scaling", [4, 1, 2, 8])
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["size"], r["groups"], r["skipped_groups"]) for r in rows] == [
        ("1", "6", "0"), ("2", "4", "2"), ("4", "1", "5"), ("8", "0", "6")]
    assert all(float(r["seconds_per_image_median"]) >= 0 for r in rows[:3])
    assert rows[3]["seconds_per_image_median"] == ""
    assert not (tmp_path / "scaling" / "size-8").exists()
    for size, count in ((1, 6), (2, 4), (4, 1)):
        run = tmp_path / "scaling" / f"size-{size}"
        images = runs.read_images(run)
        assert len(images) == count
        assert all(image.sidecar["num_references"] == len(image.sidecar["references"]) == size for image in images)
        assert runs.read_run_info(run)["settings"]["references_per_group"] == size
    # Same group, same seed at every size: only the references change.
    seeds = {image.sidecar["seed"] for size in (1, 2, 4)
             for image in runs.read_images(tmp_path / "scaling" / f"size-{size}") if image.group_id == "g3"}
    assert seeds == {group_seed(0, "g3")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_run_commands(parser.add_subparsers(dest="command"))
    return parser


def test_every_option_is_explained():
    commands = _parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"run", "scaling"}
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"bench {name} {action.option_strings} has no help"


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps must be between 1 and 1000"),
    (["--images-per-group", "17"], "--images-per-group"),
    (["--method", "lora", "--lora-steps", "0"], "lora steps"),
    (["--limit", "0"], "--limit"),
    (["--dtype", "float8"], "dtype"),
])
def test_bad_options_fail_before_any_model_loads(bench, tmp_path, extra, message):
    args = _parser().parse_args(["run", "--bench", str(bench), "--output", str(tmp_path / "run"),
                                 "--model", str(tmp_path / "no-model"), *FAST, *extra])
    with pytest.raises(EasyRefError, match=message):
        args.handler(args)
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_another_benchmarks_folder_before_loading(bench, tmp_path):
    run_benchmark(write_manifest(tmp_path / "other", [1]), Fake(), tmp_path / "run")
    args = _parser().parse_args(["run", "--bench", str(bench), "--output", str(tmp_path / "run"),
                                 "--model", str(tmp_path / "no-model"), *FAST])
    with pytest.raises(BenchFormatError, match="different benchmark"):
        args.handler(args)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_shards_each_group_exactly_once(tiny_model, bench, tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()),
               *BENCH, "run", "--bench", str(bench), "--model", str(tiny_model), "--output", str(output), *FAST]
    env = fast_cpu_env(tmp_path / "site", dict(os.environ))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sidecars = sorted((output / runs.IMAGES).glob("*/*.json"))
    groups = [json.loads(path.read_text()) for path in sidecars]
    assert sorted(g["group_id"] for g in groups) == [f"g{i}" for i in range(6)]  # each group exactly once
    assert {g["process_index"] for g in groups} == {0, 1}
    assert all(g["num_processes"] == 2 and g["seed"] == group_seed(0, g["group_id"]) for g in groups)
    # Said once, by the main process: what was written and what to run next.
    assert result.stdout.startswith(f"{output}: 6 images of 6 groups") and result.stdout.count("images of") == 1
    assert f"easyref bench score {output}" in result.stdout


def test_scaling_command_writes_a_run_folder_per_size_and_the_csv(tiny_model, bench, tmp_path):
    output = tmp_path / "scaling"
    command = [sys.executable, *BENCH, "scaling", "--bench", str(bench), "--model", str(tiny_model),
               "--method", "text-only", "--output", str(output), "--sizes", "2", "3", *FAST]
    result = subprocess.run(command, env=fast_cpu_env(tmp_path / "site", dict(os.environ)), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(output / CSV_NAME)
    rows = list(csv.DictReader((output / CSV_NAME).open()))
    assert [(r["size"], r["groups"], r["skipped_groups"]) for r in rows] == [("2", "4", "2"), ("3", "2", "4")]
    assert len(runs.read_images(output / "size-3")) == 2
    assert "size 3: 2 groups generated, 4 skipped" in result.stderr


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_lock_is_gone_after(bench, tmp_path):
    from easyref.errors import FolderInUseError
    from easyref.files import LOCK_FILE, folder_lock

    with folder_lock(tmp_path / "run", "easyref bench run --method other"):
        method = Fake()
        with pytest.raises(FolderInUseError, match="in use by easyref bench run --method other"):
            run_benchmark(bench, method, tmp_path / "run")
        assert method.generated == [] and not (tmp_path / "run" / runs.RUN_INFO).exists()
    run = run_benchmark(bench, Fake(), tmp_path / "run")
    assert not (run / LOCK_FILE).exists() and len(runs.read_images(run)) == 6


@pytest.mark.parametrize("damage, message", [
    ("empty", "group g3: .*g3_r1.png: file is empty"),
    ("not an image", "group g3: .*g3_r1.png: not an image"),
    ("too many", "group g3: got 129 reference images; give between 1 and 128"),
])
def test_a_bad_reference_stops_the_run_before_any_model_loads_naming_its_group(tmp_path, damage, message):
    bench = write_manifest(tmp_path / "bench", [1, 2, 3, 2])
    if damage == "empty":
        (tmp_path / "bench" / "images" / "g3_r1.png").write_bytes(b"")
    elif damage == "not an image":
        (tmp_path / "bench" / "images" / "g3_r1.png").write_text("hello")
    else:
        lines = bench.read_text().splitlines()
        record = json.loads(lines[3])
        record["references"] = record["references"][:1] * 129
        lines[3] = json.dumps(record)
        bench.write_text("\n".join(lines) + "\n")
    args = _parser().parse_args(["run", "--bench", str(bench), "--output", str(tmp_path / "run"),
                                 "--model", str(tmp_path / "no-model"), *FAST])
    with pytest.raises(BenchFormatError, match=message):
        args.handler(args)
    assert not (tmp_path / "run").exists()
    # --limit leaves the bad group out: then nothing stops the run before the model (here: missing) loads.
    args = _parser().parse_args(["run", "--bench", str(bench), "--output", str(tmp_path / "run"),
                                 "--model", str(tmp_path / "no-model"), "--limit", "3", *FAST])
    with pytest.raises(EasyRefError, match="no-model"):
        args.handler(args)
