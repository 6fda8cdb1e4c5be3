"""docs/RESULTS.md from the ShapesWorld experiments: the paper's tables and figures, measured.

Every number is read from the run folders the steps of :func:`easyref.shapes.experiments.experiment_steps`
wrote (``judge.csv`` for the judge's exact metrics, ``scores.csv`` for CLIP-I / CLIP-T / DINO-I),
with group-bootstrap 95% intervals; the targets of the issue are checked against them here, so
the document says "missed" by itself when a number falls short.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from easyref.bench.metrics import METRICS, summarize
from easyref.files import atomic_write
from easyref.shapes.scoring import read_scores, summarize_run

SPLITS = ("held-in", "held-out")
EXAMPLES_FIGURE = "shapesworld-examples.png"
JUDGE_KEYS = ("concept_ok", "prompt_ok", "both")
LABELS = {
    "easyref": "EasyRef (tokens)",
    "easyref-average": "EasyRef, average aggregation",
    "easyref-concat": "EasyRef, concat aggregation",
    "easyref-no-single": "EasyRef without stage single",
    "easyref-multi-only": "EasyRef, stage multi only",
    "ip-adapter": "IP-Adapter (references averaged)",
    "lora": "LoRA per group (subset)",
    "text-only": "text only (base model)",
}


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "–"
    return f"{entry['mean']:.3f} ({entry['low']:.2f}–{entry['high']:.2f})"


def concept_share(run: Path) -> dict[str, dict]:
    """Per split: the share of the group's concept attributes the judge finds right, image by image.

    Partial credit: where every attribute right (``concept``) is rare, it still shows which method
    carries *more* of the concept from the references into the image.
    """
    from easyref.bench.metrics import bootstrap_interval
    from easyref.shapes.groups import CONCEPT_ATTRIBUTES

    by_group: dict[str, dict[str, list[float]]] = {}
    for row in read_scores(run):
        names = CONCEPT_ATTRIBUTES[row["kind"]]
        share = float(np.mean([row[f"{name}_ok"] for name in names]))
        by_group.setdefault(row["split"], {}).setdefault(row["group_id"], []).append(share)
    out = {}
    for split, groups in by_group.items():
        means = np.array([np.mean(values) for values in groups.values()])
        low, high = bootstrap_interval(means)
        out[split] = {"mean": float(means.mean()), "low": float(low[0]), "high": float(high[0]),
                      "groups": len(means)}
    return out


def run_summary(run: Path) -> dict[str, dict]:
    """Per split: the judge's concept / prompt / both (and the concept share), and the CLIP-I / CLIP-T /
    DINO-I means, each with its interval."""
    judged = summarize_run(run)
    shares = concept_share(run)
    measured = {row["split"]: row for row in summarize(run / "scores.csv") if row["domain"] == "all"} \
        if (run / "scores.csv").is_file() else {}
    out = {}
    for split in SPLITS:
        entry = {key: judged.get(split, {}).get(key) for key in JUDGE_KEYS}
        entry["concept_share"] = shares.get(split)
        row = measured.get(split)
        for metric in METRICS:
            entry[metric] = None if row is None else {"mean": row[metric], "low": row[f"{metric}_low"],
                                                      "high": row[f"{metric}_high"], "groups": row["groups"]}
        out[split] = entry
    return out


def method_table(summaries: dict[str, dict], methods: Sequence[str],
                 extra: tuple[str, dict[str, str]] | None = None) -> list[str]:
    """A markdown table: one row per (method, split), judge metrics then CLIP/DINO metrics; ``extra`` adds
    one column (its name, and a value per method)."""
    header = ["method", *([extra[0]] if extra else []), "split", "groups",
              "concept", "prompt", "both", "concept share", "CLIP-I", "CLIP-T", "DINO-I"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        if method not in summaries:
            continue
        for split in SPLITS:
            entry = summaries[method][split]
            groups = (entry["concept_ok"] or {}).get("groups", "–")
            cells = [LABELS.get(method, method), *([extra[1][method]] if extra else []), split, str(groups),
                     *(_cell(entry[key]) for key in (*JUDGE_KEYS, "concept_share")),
                     *(_cell(entry[m]) for m in METRICS)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def scaling_curves(runs: dict[str, Path]) -> dict[str, dict[str, list[dict]]]:
    """method -> split -> points sorted by group size, each {size, concept, share, seconds}: the concept
    accuracy and concept share summaries and the median seconds per image."""
    from easyref.bench.runs import read_images

    curves: dict[str, dict[str, list]] = {}
    for name, run in runs.items():
        if not name.startswith("scaling/"):
            continue
        _, method, size = name.split("/")
        judged, shares = summarize_run(run), concept_share(run)
        seconds = float(np.median([image.sidecar["seconds_per_image"] for image in read_images(run)]))
        for split in SPLITS:
            if split in judged:
                curves.setdefault(method, {}).setdefault(split, []).append(
                    {"size": int(size), "concept": judged[split]["concept_ok"], "share": shares[split],
                     "seconds": seconds})
    for by_split in curves.values():
        for points in by_split.values():
            points.sort(key=lambda point: point["size"])
    return curves


def scaling_figure(curves: dict, path: Path) -> Path:
    """Fig. 9's analogue: concept accuracy and concept share (with intervals) and seconds per image
    against group size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy, share, seconds) = plt.subplots(1, 3, figsize=(14, 4))
    for method, by_split in sorted(curves.items()):
        for split, points in sorted(by_split.items()):
            sizes = [p["size"] for p in points]
            for axes, key in ((accuracy, "concept"), (share, "share")):
                means = np.array([p[key]["mean"] for p in points])
                errors = np.array([[p[key]["mean"] - p[key]["low"], p[key]["high"] - p[key]["mean"]]
                                   for p in points]).T
                axes.errorbar(sizes, means, yerr=errors, marker="o", capsize=3, label=f"{LABELS[method]}, {split}",
                              linestyle="-" if split == "held-in" else "--")
            if split == "held-in":
                seconds.plot(sizes, [p["seconds"] for p in points], marker="o", label=LABELS[method])
    for axes, label in ((accuracy, "concept accuracy (judge)"), (share, "concept share (judge)"),
                        (seconds, "seconds per image (median)")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("number of references")
        axes.set_ylabel(label)
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
    accuracy.set_ylim(0, 1)
    share.set_ylim(0, 1)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return path


def qualitative_figure(runs: dict[str, Path], methods: Sequence[str], path: Path, per_split_kind: int = 2) -> Path:
    """Rows of groups: references | EasyRef | baselines, held-in and held-out, hard cases included."""
    from easyref.bench.runs import read_images
    from easyref.images import load_image
    from easyref.shapes.figures import rows_figure

    images = {method: {image.group_id: image for image in read_images(runs[method])}
              for method in methods if method in runs}
    first = images[methods[0]]
    by_key: dict[tuple, list[str]] = {}
    hard: list[str] = []
    rows_by_id = {row["group_id"]: row for row in read_scores(runs[methods[0]])}
    for group_id, row in rows_by_id.items():
        by_key.setdefault((row["split"], row["kind"]), []).append(group_id)
        if row["hard"]:
            hard.append(group_id)
    chosen = [gid for key in sorted(by_key) for gid in by_key[key][:per_split_kind]] + hard[:2]
    rows = []
    for group_id in chosen:
        sidecar = first[group_id].sidecar
        references = [load_image(p) for p in sidecar["references"]]
        outputs = [load_image(images[m][group_id].path) for m in methods if group_id in images.get(m, {})]
        row = rows_by_id[group_id]
        note = f" [{row['hard']}]" if row["hard"] else ""
        rows.append(([references, outputs], f"{row['split']} {row['kind']}{note}: \"{sidecar['caption']}\""))
    title = "references | " + " | ".join(LABELS.get(m, m) for m in methods if m in images)
    return rows_figure(rows, path, title=title)


def _entry(summaries: dict, method: str, split: str, key: str) -> dict | None:
    return summaries.get(method, {}).get(split, {}).get(key)


def _separated(a: dict, b: dict) -> bool:
    return a["low"] > b["high"]


def targets(summaries: dict, curves: dict) -> list[str]:
    """The issue's targets, each with the measured number and "met" or "missed"."""
    lines = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    easyref = _entry(summaries, "easyref", "held-out", "concept_ok")
    ip = _entry(summaries, "ip-adapter", "held-out", "concept_ok")
    if easyref:
        lines.append(f"- held-out concept accuracy at 4 references ≥ 0.85 for EasyRef: {_cell(easyref)} "
                     f"{verdict(easyref['mean'] >= 0.85)}")
    if easyref and ip:
        gap = easyref["mean"] - ip["mean"]
        lines.append(f"- EasyRef ≥ 0.15 above IP-Adapter-average on it, intervals apart: {gap:+.3f}, intervals "
                     f"{'apart' if _separated(easyref, ip) else 'overlap'} "
                     f"{verdict(gap >= 0.15 and _separated(easyref, ip))}")
    for split in SPLITS:
        points = {p["size"]: p["concept"]["mean"] for p in curves.get("easyref", {}).get(split, [])}
        if 1 in points and 8 in points:
            lines.append(f"- EasyRef's concept accuracy rises from 1 to 8 references ({split}): "
                         f"{points[1]:.3f} → {points[8]:.3f} {verdict(points[8] > points[1])}")
    prompt = _entry(summaries, "easyref", "held-out", "prompt_ok")
    if prompt:
        held_in = _entry(summaries, "easyref", "held-in", "prompt_ok")
        lines.append(f"- prompt accuracy ≥ 0.85 for EasyRef: held-in {_cell(held_in)}, held-out {_cell(prompt)} "
                     f"{verdict(min(prompt['mean'], held_in['mean']) >= 0.85)}")
    tokens = [(m, _entry(summaries, m, "held-out", "concept_ok")) for m in ("easyref", "easyref-average",
                                                                           "easyref-concat")]
    if all(entry for _, entry in tokens):
        best = tokens[0][1]["mean"] >= max(entry["mean"] for _, entry in tokens[1:])
        lines.append("- `tokens` ≥ `average` and `concat` on held-out concept accuracy: "
                     + ", ".join(f"{m} {entry['mean']:.3f}" for m, entry in tokens) + f" {verdict(best)}")
    return lines


def cost_lines(timings: dict) -> list[str]:
    """What the run cost, from ``timings.json`` (:func:`easyref.shapes.schedule.run_steps`): the wall time
    of every invocation added up, and each step's minutes over all the invocations it ran in, failed and
    interrupted attempts included."""
    runs = timings["runs"]
    total = timings["wall_seconds"]
    settings = sorted({(run["jobs"], run["threads"]) for run in runs})
    minutes: dict[str, float] = {}
    invocations: dict[str, int] = {}
    for run in runs:
        failed = run.get("failed") if isinstance(run.get("failed"), dict) else {}  # early files: names only
        for part in (run["steps"], run.get("unfinished", {}), failed):
            for name, seconds in part.items():
                minutes[name] = minutes.get(name, 0.0) + seconds / 60
                invocations[name] = invocations.get(name, 0) + 1
    lines = [f"{total / 3600:.2f} h of wall time ({total / 60:.0f} min) over {len(runs)} invocation(s) of the "
             "steps (writing the world before them and the report after them take a few minutes more), with "
             + "; ".join(f"{jobs} step(s) at once, {threads} torch thread(s) each" for jobs, threads in settings)
             + ". Steps that ran side by side overlap, so their minutes can add up to more than the wall time.",
             "", "| step | minutes | invocations |", "|---|---|---|"]
    return lines + [f"| {name} | {value:.1f} | {invocations[name]} |" for name, value in minutes.items()]


def write_results(runs: dict[str, Path], document: Path, figures: Path, *, command: str, notes: Sequence[str] = (),
                  tokens: dict[str, str] | None = None, timings: dict | None = None) -> Path:
    """Write ``document`` (markdown) and its PNGs into ``figures`` from the scored run folders."""
    figures.mkdir(parents=True, exist_ok=True)
    summaries = {name: run_summary(run) for name, run in runs.items() if not name.startswith("scaling/")}
    curves = scaling_curves(runs)
    lines = ["# ShapesWorld results", "",
             f"Produced by `{command}`; every number below comes from the run folders it wrote, read by the",
             "judge (concept / prompt / both: every attribute the group shares / the caption names is right)",
             "and by the world's own CLIP and DINO (CLIP-I, DINO-I: cosines; CLIP-T: CLIPScore, 2.5 x max(cosine,",
             "0), the paper's scale). Parentheses: group-bootstrap 95%",
             "intervals. The benchmark gives every method the same 4 references per group (held-in: training",
             "combinations; held-out: combinations and the `scene` kind never seen in training).",
             "*Concept share* gives partial credit: the share of the group's concept attributes that are right",
             "(identity: shape, colour, pattern; style: background, texture, pattern; scene: all five).", "",
             *notes, "", "## Targets", "", *targets(summaries, curves), "",
             "## Table 3 analogue: methods", "",
             *method_table(summaries, ("easyref", "ip-adapter", "lora", "text-only")), ""]
    if tokens:
        lines += ["## Table 5 analogue: how a group becomes tokens (each variant trained)", "",
                  *method_table(summaries, ("easyref", "easyref-average", "easyref-concat"),
                                extra=("tokens", tokens)), ""]
    if "easyref-no-single" in summaries or "easyref-multi-only" in summaries:
        lines += ["## Progressive training", "",
                  *method_table(summaries, ("easyref", "easyref-no-single", "easyref-multi-only")), ""]
    if curves:
        scaling_figure(curves, figures / "shapesworld-scaling.png")
        sizes = sorted({p["size"] for by_split in curves.values() for points in by_split.values() for p in points})
        lines += ["## Fig. 9 analogue: more references", "",
                  f"![concept accuracy, concept share and seconds per image against the number of references]"
                  f"({figures.name}/shapesworld-scaling.png)", "",
                  "| method | measure | " + " | ".join(map(str, sizes)) + " |",
                  "|" + "---|" * (len(sizes) + 2)]
        for method, by_split in sorted(curves.items()):
            for split, points in sorted(by_split.items()):
                for key, label in (("concept", "concept accuracy"), ("share", "concept share")):
                    lines.append(f"| {LABELS[method]} | {label}, {split} | "
                                 + " | ".join(f"{p[key]['mean']:.3f}" for p in points) + " |")
            lines.append(f"| {LABELS[method]} | seconds per image | "
                         + " | ".join(f"{p['seconds']:.3f}" for p in by_split.get("held-in", [])) + " |")
        lines.append("")
    shown = [m for m in ("easyref", "ip-adapter", "text-only") if m in runs]
    if shown:
        qualitative_figure(runs, shown, figures / "shapesworld-samples.png", per_split_kind=1)
        lines += ["## Samples", "", f"![references, then {', '.join(LABELS[m] for m in shown)}]"
                  f"({figures.name}/shapesworld-samples.png)", ""]
    if (figures / EXAMPLES_FIGURE).is_file():
        lines += ["## The exported model on the example groups", "",
                  "What `easyref generate --model OUTPUT/shapesworld --example NAME` makes (seed 0, 30 steps) for",
                  "every example group (`easyref shapes examples`):", "",
                  f"![references, then the exported model's image]({figures.name}/{EXAMPLES_FIGURE})", ""]
    if timings:
        lines += ["## What it cost", "", *cost_lines(timings), ""]
    return atomic_write(document, lambda tmp: tmp.write_text("\n".join(lines)))


def examples_figure(model: Path, path: Path, *, steps: int = 30, seed: int = 0) -> Path:
    """The README's picture: each shipped example group's references, then what ``model`` makes of
    them and their caption (seed ``seed``), exactly as ``easyref generate --example NAME`` does."""
    from easyref.pipeline import EasyRefPipeline
    from easyref.shapes.examples import example_group, example_images, example_names
    from easyref.shapes.figures import rows_figure

    pipe = EasyRefPipeline.from_pretrained(model, device="cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in example_names():
        group = example_group(name)
        references = example_images(group)
        image = pipe(references, group.caption, seed=seed, num_inference_steps=steps, progress=False).images[0]
        rows.append(([references, [image]], f"{name}: \"{group.caption}\""))
    return rows_figure(rows, path, title="references | EasyRef (bundled shapesworld model)")
