"""The MRBench report: every run and split listed, best cells bolded, published numbers kept apart, plots drawn."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from easyref.bench.manifest import BenchFormatError
from easyref.bench.metrics import COLUMNS, SCORES
from easyref.bench.report import write_report
from easyref.bench.runs import open_run
from easyref.errors import EasyRefError
from test_bench_manifest import bench_parser

# Each fake run: (method, settings, offset added to every score). "easyref" is best everywhere.
RUNS = (("ip-adapter", {"scale": 0.6}, 0.0), ("easyref", {"aggregation": "average"}, 0.02),
        ("easyref", {"aggregation": "easyref"}, 0.05))


def _fake_run(root: Path, manifest: Path, method: str, settings: dict, offset: float, groups: int = 12) -> Path:
    """A run folder with ``run.json`` and a made-up ``scores.csv``: ``groups`` groups (2 domains) per split."""
    run = open_run(root / f"{method}-{offset}", manifest, method, settings)
    rng = np.random.default_rng(0)
    with open(run / SCORES, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for split in ("held-in", "held-out"):
            for g in range(groups):
                for seed in range(2):
                    values = rng.uniform(0.5, 0.8, 4) + offset
                    writer.writerow([f"{split}-{g}", split, f"d{g % 2}", method, seed, seed, 1 + g % 4,
                                     f"images/{split}-{g}/{seed}.png", *(f"{v:.6f}" for v in values)])
    return run


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    manifest = tmp_path / "bench.jsonl"
    manifest.write_text("{}\n")  # only its digest is read by open_run
    return [_fake_run(tmp_path, manifest, *spec) for spec in RUNS]


def test_report_lists_every_run_and_split_and_bolds_the_best(runs, tmp_path):
    report = write_report(runs, tmp_path / "report").read_text()
    measured = report.split("## Measured here")[1].split("###")[0]
    header, _, *rows = [line for line in measured.splitlines() if line.startswith("|")]
    assert header.count("held-in") == 3 and header.count("held-out") == 3
    for metric in ("CLIP-I", "CLIP-T", "DINO-I"):
        assert f"held-out {metric}" in header
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == ["ip-adapter", "easyref (aggregation=average)", "easyref (aggregation=easyref)"]
    assert rows[2].count("**") == 12 and "**" not in rows[0] + rows[1]
    assert " ± " in rows[0]


def test_report_keeps_published_numbers_apart_and_compares_pairs(runs, tmp_path):
    report = write_report(runs, tmp_path / "report").read_text()
    published = report.split("## Published (paper), not measured here")[1].split("## Paired")[0]
    assert "0.843" in published and "0.876" in published and "failed" in published
    assert "0.843" not in report.split("## Published")[0]
    comparisons = report.split("## Paired comparisons")[1]
    assert comparisons.count("### A = ") == 3
    assert "A = ip-adapter vs B = easyref (aggregation=average)" in comparisons
    for plot in ("metrics.png", "group_size.png"):
        assert f"]({plot})" in report
        assert (tmp_path / "report" / plot).read_bytes().startswith(b"\x89PNG")


def test_a_run_without_scores_says_how_to_make_them(runs, tmp_path):
    (runs[1] / SCORES).unlink()
    with pytest.raises(BenchFormatError, match="easyref bench score"):
        write_report(runs, tmp_path / "report")


def test_missing_matplotlib_names_the_extra(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(EasyRefError, match=r"easyref\[bench\]"):
        write_report(runs, tmp_path / "report")


def test_bench_report_command(runs, tmp_path, capsys):
    args = bench_parser().parse_args(["bench", "report", *map(str, runs), "--output", str(tmp_path / "out")])
    assert args.handler(args) == 0
    assert (tmp_path / "out" / "report.md").is_file()


def test_group_size_plot_ticks_are_the_whole_reference_counts(runs, tmp_path, monkeypatch):
    from easyref.bench import report

    seen = []
    finish = report._finish

    def capture(figure, axes, path, plt):
        seen.extend([tick.get_text() for tick in axis.get_xticklabels()] for axis in axes)
        return finish(figure, axes, path, plt)

    monkeypatch.setattr(report, "_finish", capture)
    write_report(runs, tmp_path / "report")
    sizes = ["1", "2", "3", "4"]  # the fake runs' groups hold 1 + g % 4 references
    assert sizes in seen and all(labels == sizes for labels in seen[-3:])


def test_few_groups_get_no_best_and_flagged_win_shares(tmp_path):
    """Three groups per split: no bold "best", a caveat under the table, win shares marked; nested settings
    (an adapter config) stay in run.json instead of filling the Runs table."""
    manifest = tmp_path / "bench.jsonl"
    manifest.write_text("{}\n")
    runs = [_fake_run(tmp_path, manifest, "ip-adapter", {"scale": 0.6}, 0.0, groups=3),
            _fake_run(tmp_path, manifest, "easyref", {"scale": 1.0, "adapter_config": {"tokens": 64}}, 0.05, groups=3)]
    report = write_report(runs, tmp_path / "report").read_text()
    measured = report.split("## Measured here")[1].split("###")[0]
    assert "**" not in measured and "No best marked for held-in, held-out: fewer than 10 groups" in measured
    comparisons = report.split("## Paired comparisons")[1]
    assert "| 0%† |" in comparisons and "† fewer than 10 groups" in comparisons  # A = ip-adapter never wins
    runs_table = report.split("## Runs")[1].split("## Measured")[0]
    assert "scale=1.0, (+1 more in run.json)" in runs_table and "tokens" not in runs_table
