"""The MRBench report: measured scores laid out like the paper's tables, with intervals, comparisons and plots.

``report.md`` holds, in order: the runs; the measured table (rows = runs, columns = split x
metric as in paper Table 3, each cell ``mean ± half-width of the 95% interval``, the best mean
of each column in bold); the same per domain; the paper's published numbers (Tables 3, 5 and
2), clearly labelled as not measured here; paired comparisons between runs on the same
benchmark; and two plots (``metrics.png``, ``group_size.png``).

The report reads only ``run.json`` and ``scores.csv`` / ``scores.json`` of each run, so it takes
seconds and can be rebuilt after every new run. Plots need matplotlib, the optional ``bench``
extra (``pip install 'easyref[bench]'``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from easyref.bench.manifest import BenchFormatError
from easyref.bench.metrics import (
    METRIC_LABELS,
    METRICS,
    GroupScore,
    bootstrap_interval,
    compare,
    group_scores,
    read_scores,
    scores_info,
    split_order,
    summarize,
)
from easyref.bench.runs import read_run_info
from easyref.errors import EasyRefError
from easyref.files import atomic_path, atomic_write

REPORT = "report.md"
# Below this many groups in a split, no "best" is marked and win shares are flagged: with a handful of
# groups a 100% win or a bold mean is mostly chance (the intervals show how wide it is).
MIN_GROUPS_TO_RANK = 10
METRICS_PLOT = "metrics.png"
GROUP_SIZE_PLOT = "group_size.png"

# The paper's published numbers (CLIP-I, CLIP-T, DINO-I per split), shown next to ours for reference only.
PUBLISHED: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, dict], ...]], ...] = (
    ("Table 3: MRBench", ("held-in", "held-out"), (
        ("LoRA", {"held-in": (0.831, 0.715, 0.654), "held-out": "failed"}),
        ("IP-Adapter-SDXL", {"held-in": (0.768, 0.632, 0.527), "held-out": (0.795, 0.645, 0.579)}),
        ("EasyRef", {"held-in": (0.843, 0.726, 0.672), "held-out": (0.833, 0.709, 0.614)}),
    )),
    ("Table 5: aggregating held-out references", ("held-out",), (
        ("Average (64 tokens)", {"held-out": (0.818, 0.688, 0.584)}),
        ("Concatenation (354 tokens on average)", {"held-out": (0.821, 0.692, 0.579)}),
        ("EasyRef (64 tokens)", {"held-out": (0.833, 0.709, 0.614)}),
    )),
    ("Table 2: single reference, COCO val images as references", ("coco",), (
        ("IP-Adapter-SDXL", {"coco": (0.836, 0.617, 0.650)}),
        ("EasyRef", {"coco": (0.876, 0.621, 0.873)}),
    )),
)


@dataclasses.dataclass(frozen=True)
class ScoredRun:
    """What the report needs from one run folder, read and checked before anything is written."""

    folder: Path
    label: str
    info: dict
    rows: list[dict]
    summary: list[dict]
    groups: dict[str, GroupScore]
    models: dict


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or one clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise EasyRefError("the benchmark report draws plots with matplotlib, which is not installed: "
                           "pip install 'easyref[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_labels(infos: Sequence[dict], folders: Sequence[Path]) -> list[str]:
    """Row names: the method, plus the settings that tell apart runs of the same method, plus the
    folder name if even those are equal (e.g. two seeds of the same configuration)."""
    labels = []
    for info in infos:
        same = [other for other in infos if other.get("method") == info.get("method")]
        settings = info.get("settings") or {}
        differing = sorted(key for key in settings
                           if any((other.get("settings") or {}).get(key) != settings[key] for other in same))
        detail = ", ".join(f"{key}={settings[key]}" for key in differing)
        labels.append(f"{info.get('method', '?')} ({detail})" if detail else str(info.get("method", "?")))
    return [f"{label} [{folder.name}]" if labels.count(label) > 1 else label
            for label, folder in zip(labels, folders, strict=True)]


def load_runs(runs: Sequence[str | Path]) -> list[ScoredRun]:
    """Read every run's info and scores; refuse runs scored with different metric models."""
    folders = [Path(run) for run in runs]
    if not folders:
        raise BenchFormatError("give at least one run folder")
    infos = [read_run_info(folder) for folder in folders]
    rows = [read_scores(folder) for folder in folders]
    models = [scores_info(folder) for folder in folders]
    if len({(m.get("clip"), m.get("dino")) for m in models if m}) > 1:
        raise BenchFormatError("the runs were scored with different CLIP/DINOv2 models; their numbers are not "
                               "comparable: re-score them with the same --clip and --dino")
    labels = run_labels(infos, folders)
    return [ScoredRun(folder, label, info, scores, summarize(scores), group_scores(scores), scored_with)
            for folder, label, info, scores, scored_with in zip(folders, labels, infos, rows, models, strict=True)]


# -- Markdown -----------------------------------------------------------------------------------

def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return lines + [""]


def _settings_cell(settings: dict) -> str:
    """The run's plain settings (``steps=30, scale=1.0``); nested ones (adapter configs, ...) stay in run.json."""
    plain = [f"{key}={value}" for key, value in sorted(settings.items()) if not isinstance(value, (dict, list))]
    nested = sum(isinstance(value, (dict, list)) for value in settings.values())
    return ", ".join(plain + ([f"(+{nested} more in run.json)"] if nested else [])) or "—"


def _column_header(splits: Sequence[str]) -> list[str]:
    return [f"{split} {METRIC_LABELS[metric]}" for split in splits for metric in METRICS]


def measured_table(runs: Sequence[ScoredRun]) -> list[str]:
    """Rows = runs, columns = split x metric; ``mean ± half-width``, best of each column in bold.

    The best is chosen on the mean rounded to the 3 decimals shown, so equal-looking cells are
    bolded together; a split where any run has fewer than :data:`MIN_GROUPS_TO_RANK` groups gets no
    bold, and a line under the table says so.
    """
    splits = split_order(row["split"] for run in runs for row in run.summary)
    found = {(k, row["split"]): row for k, run in enumerate(runs) for row in run.summary if row["domain"] == "all"}
    small = [split for split in splits
             if min(row["groups"] for (_, s), row in found.items() if s == split) < MIN_GROUPS_TO_RANK]
    best = {(split, metric): max((round(row[metric], 3) for (_, s), row in found.items() if s == split),
                                 default=None) if split not in small else None
            for split in splits for metric in METRICS}
    body = []
    for k, run in enumerate(runs):
        cells = [run.label]
        for split in splits:
            row = found.get((k, split))
            for metric in METRICS:
                if row is None:
                    cells.append("—")
                    continue
                text = f"{row[metric]:.3f} ± {(row[f'{metric}_high'] - row[f'{metric}_low']) / 2:.3f}"
                cells.append(f"**{text}**" if round(row[metric], 3) == best[split, metric] else text)
        body.append(cells)
    caveat = ([f"No best marked for {', '.join(small)}: fewer than {MIN_GROUPS_TO_RANK} groups, too few to "
               "rank methods; read the intervals.", ""] if small else [])
    return _table(["method", *_column_header(splits)], body) + caveat


def domain_table(runs: Sequence[ScoredRun]) -> list[str]:
    body = [[run.label, row["split"], row["domain"], row["groups"], row["images"],
             *(f"{row[m]:.3f} [{row[f'{m}_low']:.3f}, {row[f'{m}_high']:.3f}]" for m in METRICS)]
            for run in runs for row in run.summary if row["domain"] != "all"]
    return _table(["method", "split", "domain", "groups", "images", *(METRIC_LABELS[m] for m in METRICS)], body)


def _published_cells(value: tuple | str | None) -> list[str]:
    if isinstance(value, tuple):
        return [f"{v:.3f}" for v in value]
    return [value or "—"] * len(METRICS)


def published_tables() -> list[str]:
    lines = []
    for title, splits, rows in PUBLISHED:
        body = [[method, *(cell for split in splits for cell in _published_cells(cells.get(split)))]
                for method, cells in rows]
        lines += [f"### {title}", "", *_table(["method", *_column_header(splits)], body)]
    return lines


def comparison_tables(runs: Sequence[ScoredRun]) -> list[str]:
    """Paired comparisons between each pair of runs made on the same benchmark (same manifest digest)."""
    lines = []
    for a, b in itertools.combinations(runs, 2):
        lines += [f"### A = {a.label} vs B = {b.label}", ""]
        if a.info.get("bench_sha256") != b.info.get("bench_sha256"):
            lines += ["Not compared: the two runs were made on different benchmarks.", ""]
            continue
        rows = compare(a.rows, b.rows)
        body = [[row["split"], METRIC_LABELS[row["metric"]], row["groups"], f"{row['mean_a']:.3f}",
                 f"{row['mean_b']:.3f}", f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]",
                 f"{row['a_wins']:.0%}" + ("†" if row["groups"] < MIN_GROUPS_TO_RANK else ""), f"{row['ties']:.0%}"]
                for row in rows]
        lines += _table(["split", "metric", "groups", "A", "B", "A − B [95% CI]", "A wins", "ties"], body)
        if any(row["groups"] < MIN_GROUPS_TO_RANK for row in rows):
            lines += [f"† fewer than {MIN_GROUPS_TO_RANK} groups: a win share this small a sample says little.", ""]
    return lines


# -- plots --------------------------------------------------------------------------------------

def _finish(figure, axes, path: Path, plt) -> Path:
    """Shared axis label, one legend under the panels (never over the data), atomic PNG write."""
    axes[0].set_ylabel("cosine (CLIP-T: CLIPScore), 95% CI")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 3),
                  fontsize="small", frameon=False)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_metrics(runs: Sequence[ScoredRun], path: Path, plt) -> Path:
    """Bars per split and run, one panel per metric, with the asymmetric 95% interval as error bars."""
    splits = split_order(row["split"] for run in runs for row in run.summary)
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6), squeeze=False)
    width = 0.8 / len(runs)
    lowest = min(row[f"{m}_low"] for run in runs for row in run.summary for m in METRICS)
    for axis, metric in zip(axes[0], METRICS, strict=True):
        for k, run in enumerate(runs):
            rows = {row["split"]: row for row in run.summary if row["domain"] == "all"}
            xs = [i for i, split in enumerate(splits) if split in rows]
            means = np.array([rows[splits[i]][metric] for i in xs])
            low = np.array([rows[splits[i]][f"{metric}_low"] for i in xs])
            high = np.array([rows[splits[i]][f"{metric}_high"] for i in xs])
            axis.bar(np.array(xs) + (k - (len(runs) - 1) / 2) * width, means, width,
                     yerr=[means - low, high - means], capsize=3, label=run.label)
        axis.set_xticks(range(len(splits)), splits)
        axis.set_title(METRIC_LABELS[metric])
        # Methods differ in the second decimal: a zero baseline would hide every difference.
        axis.set_ylim(bottom=max(0.0, lowest - 0.05))
    return _finish(figure, axes[0], path, plt)


def plot_group_size(runs: Sequence[ScoredRun], path: Path, plt) -> Path:
    """Mean score of groups with the same number of references, per run, with bootstrap intervals."""
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6), squeeze=False)
    all_sizes = [g.references for run in runs for g in run.groups.values()]
    for run in runs:
        sizes = sorted({g.references for g in run.groups.values()})
        values = [np.stack([g.values for g in run.groups.values() if g.references == size]) for size in sizes]
        means = np.stack([v.mean(axis=0) for v in values])
        intervals = [bootstrap_interval(v) for v in values]
        low = np.stack([i[0] for i in intervals])
        high = np.stack([i[1] for i in intervals])
        for k, axis in enumerate(axes[0]):
            axis.errorbar(sizes, means[:, k], yerr=[means[:, k] - low[:, k], high[:, k] - means[:, k]],
                          marker="o", capsize=3, label=run.label)
    ticks = sorted(set(all_sizes))
    for axis, metric in zip(axes[0], METRICS, strict=True):
        if max(all_sizes) >= 8 * min(all_sizes):
            axis.set_xscale("log", base=2)
        # Whole reference counts only: the sizes that occur, no fractional or minor ticks.
        axis.set_xticks(ticks, [str(size) for size in ticks])
        axis.minorticks_off()
        axis.set_xlabel("references in the group")
        axis.set_title(METRIC_LABELS[metric])
    return _finish(figure, axes[0], path, plt)


# -- the report ---------------------------------------------------------------------------------

def write_report(runs: Sequence[str | Path], output_folder: str | Path) -> Path:
    """Write ``report.md`` and its two plots into ``output_folder`` (created if needed); return the report."""
    plt = _pyplot()
    scored = load_runs(runs)
    output = Path(output_folder)
    output.mkdir(parents=True, exist_ok=True)
    plot_metrics(scored, output / METRICS_PLOT, plt)
    plot_group_size(scored, output / GROUP_SIZE_PLOT, plt)
    models = next((run.models for run in scored if run.models), {})
    lines = [
        "# MRBench report", "",
        "Cosine similarities, higher is better. Each cell is the mean over groups (each group's images "
        "averaged first) ± half the width of its 95% bootstrap interval (1000 resamples of groups, seed 0).",
        "",
        f"Metric models: CLIP `{models.get('clip', '?')}`, DINOv2 `{models.get('dino', '?')}`.", "",
        "## Runs", "",
        *_table(["row", "folder", "method", "settings", "benchmark", "images"],
                [[run.label, run.folder, run.info.get("method", "?"),
                  _settings_cell(run.info.get("settings") or {}),
                  run.info.get("bench", "?"), len(run.rows)] for run in scored]),
        "## Measured here", "",
        "CLIP-I and DINO-I: cosine similarity to the target. CLIP-T: CLIPScore, 2.5 x max(cosine to the "
        "caption, 0), the paper's scale (raw cosines are in scores.csv as clip_t_cosine).", "",
        *measured_table(scored),
        f"![scores per split, with 95% intervals]({METRICS_PLOT})", "",
        "### By domain (mean [95% CI])", "",
        *domain_table(scored),
        "### By group size", "",
        f"![scores against the number of references]({GROUP_SIZE_PLOT})", "",
        "## Published (paper), not measured here", "",
        "Numbers copied from the EasyRef paper for orientation; different models, prompts and images.", "",
        *published_tables(),
        "## Paired comparisons", "",
        "Per group, A's mean minus B's mean on the groups both runs scored; the interval resamples groups.", "",
        *(comparison_tables(scored) if len(scored) > 1 else ["Only one run: nothing to compare.", ""]),
    ]
    return atomic_write(output / REPORT, lambda tmp: tmp.write_text("\n".join(lines)))
