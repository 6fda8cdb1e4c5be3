"""The full-size benchmark and the scale-out comparison, run on tiny models (the same code as at full size)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def full_size():
    return _load("full_size")


def test_full_size_measures_every_comparison_on_tiny_models(full_size, tmp_path, one_thread, capsys):
    out = tmp_path / "tiny.json"
    assert full_size.main(["--tiny", "--workdir", str(tmp_path / "models"), "--repeats", "1", "--skip", "memory",
                           "--json", str(out), "--markdown", str(tmp_path / "tiny.md")]) == 0
    result = json.loads(out.read_text())
    assert "errors" not in result, result.get("errors")
    step = result["unet_step"]
    assert step["flop_ratio"] > 1 and step["tokens"] == 64  # the adapter adds attention over its tokens
    rows = result["encode"]["rows"]
    assert [row["refs"] for row in rows] == [1, 2, 4]
    assert rows[0]["flops"] < rows[1]["flops"] < rows[2]["flops"]  # every reference is read
    assert all(row["time_over_flops"] == pytest.approx(row["unet_steps"] / row["flop_unet_steps"]) for row in rows)
    assert result["vision"]["max_abs_diff"] <= 1e-5 * max(1.0, result["vision"]["max_abs_value"])
    generation = result["generation"]
    assert set(generation["seconds"]) == {"easyref_new", "easyref_repeated", "bare", "ip_adapter"}
    assert all(generation["finite_images"].values())
    table = (tmp_path / "tiny.md").read_text()
    assert table == capsys.readouterr().out.strip() + "\n"
    assert "| EasyRef new references / IP-Adapter-SDXL |" in table and "(tiny models)" in table
    # the models are written once: a second run finds them
    assert json.loads((tmp_path / "models" / "done.json").read_text())["kind"] == "tiny"
    # the plot and table are drawn again from the saved numbers alone
    assert full_size.main(["--from-json", str(out), "--plot", str(tmp_path / "plot.png"), "--markdown",
                           str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == table
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_memory_process_reports_its_peak(full_size, tmp_path, one_thread):
    settings = full_size.settings_for("cpu", tiny=True)
    full_size.write_models(tmp_path / "models", settings)
    row = full_size.memory_of("easyref", tmp_path / "models", settings)
    assert row["option"] == "easyref" and row["peak_rss"] > 10_000_000  # bytes: at least torch itself
    assert full_size.memory_options(settings)[:2] == ["bare", "easyref"]
    assert "offload-model" not in full_size.memory_options(settings)  # offload needs a GPU


def test_scale_out_flags_a_config_that_did_not_take_effect_and_compares_losses():
    scale_out = _load("scale_out")
    cpu = "stage: 2 process(es) on cpu (multi_cpu), mixed precision no"
    runs = {"multi_gpu": {"losses": [1.0, 0.5], "banner": cpu}, "fsdp": {"losses": [1.0, 0.51], "banner": cpu},
            "deepspeed_zero2": {"losses": [1.0], "banner": "stage: 1 process(es) on cuda (deepspeed), mixed precision"}}
    scale_out.compare(runs)
    assert runs["multi_gpu"]["config_took_effect"] and not runs["fsdp"]["config_took_effect"]
    assert runs["fsdp"]["max_relative_gap"] == pytest.approx(0.02)
    assert runs["deepspeed_zero2"]["config_took_effect"] and runs["deepspeed_zero2"]["max_relative_gap"] is None
    assert "1 steps logged" in runs["deepspeed_zero2"]["note"]
