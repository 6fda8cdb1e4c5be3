"""MRBench metrics: scores match an independent CLIP/DINOv2 computation; intervals and comparisons behave."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, BitImageProcessorPil, CLIPImageProcessorPil, CLIPModel, Dinov2Model

from easyref.bench.manifest import Group, write_manifest
from easyref.bench.metrics import (
    COLUMNS,
    METRICS,
    bootstrap_interval,
    compare,
    read_scores,
    score_run,
    scores_info,
    summarize,
)
from easyref.bench.runs import open_run, write_group
from easyref.errors import ModelFormatError
from easyref.tiny import write_tiny_clip, write_tiny_dinov2
from test_bench_manifest import bench_parser

from conftest import random_image


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("metric-models")
    write_tiny_clip(folder / "clip")
    write_tiny_dinov2(folder / "dino")
    return folder / "clip", folder / "dino"


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, metric_models) -> Path:
    """Three groups; image 0 of each is a copy of the target, image 1 a different picture."""
    root = tmp_path_factory.mktemp("bench")
    groups = []
    for g in range(3):
        paths = []
        for k in range(3):
            path = root / f"g{g}-{k}.png"
            random_image(40 + 8 * k, 48, seed=10 * g + k).save(path)
            paths.append(path)
        groups.append(Group(f"g{g}", "held-in" if g < 2 else "held-out", "toys", tuple(paths[:2]), paths[2],
                            f"a photo of the toy {g}"))
    manifest = write_manifest(groups, root / "bench.jsonl")
    run = open_run(root / "run", manifest, "easyref", {"scale": 1.0})
    for g, group in enumerate(groups):
        images = [Image.open(group.target).convert("RGB"), random_image(64, 64, seed=100 + g)]
        write_group(run, group, images, [{"method": "easyref", "seed": s, "seconds": 0.1} for s in range(2)])
    score_run(run, *metric_models, batch_size=4, device="cpu")
    return run


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))


def test_scores_file_has_one_row_per_image_and_the_documented_columns(scored_run):
    with open(scored_run / "scores.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert len(rows) == 6
    assert {r["group_id"] for r in rows} == {"g0", "g1", "g2"}
    assert {r["references"] for r in rows} == {"2"}
    assert scores_info(scored_run)["device"] == "cpu"


def test_identical_generated_and_target_images_score_one(scored_run):
    copies = [row for row in read_scores(scored_run) if row["index"] == "0"]
    assert len(copies) == 3
    for row in copies:
        assert row["clip_i"] == pytest.approx(1.0, abs=1e-5)
        assert row["dino_i"] == pytest.approx(1.0, abs=1e-5)


def test_scores_match_an_independent_computation(scored_run, metric_models):
    clip_folder, dino_folder = metric_models
    clip = CLIPModel.from_pretrained(clip_folder).eval()
    dino = Dinov2Model.from_pretrained(dino_folder).eval()
    clip_pixels = CLIPImageProcessorPil.from_pretrained(clip_folder)
    dino_pixels = BitImageProcessorPil.from_pretrained(dino_folder)
    tokenizer = AutoTokenizer.from_pretrained(clip_folder)
    row = next(r for r in read_scores(scored_run) if r["group_id"] == "g1" and r["index"] == "1")
    generated = Image.open(scored_run / row["image"]).convert("RGB")
    target = Image.open(scored_run.parent / "g1-2.png").convert("RGB")
    with torch.no_grad():
        clip_gen, clip_target = (clip.get_image_features(**clip_pixels(images=[im], return_tensors="pt")).pooler_output
                                 for im in (generated, target))
        text = clip.get_text_features(**tokenizer(["a photo of the toy 1"], return_tensors="pt")).pooler_output
        dino_gen, dino_target = (dino(**dino_pixels(images=[im], return_tensors="pt")).pooler_output
                                 for im in (generated, target))
    assert row["clip_i"] == pytest.approx(_cosine(clip_gen, clip_target), abs=1e-5)
    # CLIP-T is CLIPScore, the paper's scale; the raw cosine is kept beside it.
    assert row["clip_t_cosine"] == pytest.approx(_cosine(clip_gen, text), abs=1e-5)
    assert row["clip_t"] == pytest.approx(2.5 * max(_cosine(clip_gen, text), 0.0), abs=1e-5)
    assert row["dino_i"] == pytest.approx(_cosine(dino_gen, dino_target), abs=1e-5)
    assert row["clip_i"] < 0.99999


def test_a_model_of_the_wrong_kind_is_refused(scored_run, metric_models, tmp_path):
    clip_folder, dino_folder = metric_models
    with pytest.raises(ModelFormatError, match="expected 'clip'"):
        score_run(scored_run, dino_folder, dino_folder, device="cpu")
    with pytest.raises(ModelFormatError, match="no such folder"):
        score_run(scored_run, tmp_path / "nothing-here", dino_folder, device="cpu")


def _rows(group_values: dict[str, list[float]], split: str = "held-in") -> list[dict]:
    """Score rows with the same value for every metric: one row per image."""
    return [{"group_id": gid, "split": split, "domain": "d", "references": 2, **{m: v for m in METRICS}}
            for gid, values in group_values.items() for v in values]


def test_summary_weights_groups_not_images():
    rows = _rows({"a": [1.0] * 9, "b": [0.0]})
    (summary, _) = summarize(rows)
    assert summary["groups"] == 2 and summary["images"] == 10
    assert summary["clip_i"] == pytest.approx(0.5)


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_groups():
    rng = np.random.default_rng(0)
    widths = []
    for count in (10, 1000):
        values = rng.normal(0.7, 0.1, count)
        low, high = bootstrap_interval(values, seed=1)
        assert low[0] <= values.mean() <= high[0]
        widths.append(high[0] - low[0])
    assert widths[1] < widths[0] / 5
    assert bootstrap_interval(values, seed=1)[0] == bootstrap_interval(values, seed=1)[0]


def test_summary_has_a_row_per_split_and_per_domain():
    rows = _rows({"a": [0.5]}) + _rows({"b": [0.6]}, split="held-out")
    rows[-1]["domain"] = "other"
    assert [(r["split"], r["domain"]) for r in summarize(rows)] == [
        ("held-in", "all"), ("held-in", "d"), ("held-out", "all"), ("held-out", "other")]


def test_paired_comparison_sign_and_win_share():
    rng = np.random.default_rng(0)
    base = {f"g{k}": [float(v)] for k, v in enumerate(rng.uniform(0.3, 0.9, 40))}
    better = {gid: [v[0] + 0.05] for gid, v in base.items()}
    better["g0"] = [base["g0"][0] - 0.01]  # B wins one group
    for row in compare(_rows(better), _rows(base)):
        assert row["difference"] == pytest.approx((0.05 * 39 - 0.01) / 40)
        assert 0 < row["low"] <= row["difference"] <= row["high"]
        assert row["a_wins"] == pytest.approx(39 / 40)
    reverse = compare(_rows(base), _rows(better))[0]
    assert reverse["high"] < 0 and reverse["a_wins"] == pytest.approx(1 / 40)


def test_bench_score_command_prints_the_summary(scored_run, metric_models, capsys):
    clip, dino = metric_models
    args = bench_parser().parse_args(["bench", "score", str(scored_run), "--clip", str(clip), "--dino", str(dino),
                                      "--device", "cpu", "--batch-size", "3"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "held-out  all" in out and "CLIP-I" in out
