"""Exact metrics for benchmark runs on ShapesWorld: the judge reads every generated image.

``easyref bench run`` writes a run folder as for MRBench; this adds ``RUN/judge.csv`` (one row per
image: group, split, kind, hard case, number of references, ``concept_ok``, ``prompt_ok``, ``both``
and ``<attribute>_ok``) using the labels that the world's manifest carries on each line
(``shapes``: concept and prompt attributes). :func:`summarize_run` turns it into per-split means
with group-bootstrap 95% intervals, the numbers of docs/RESULTS.md.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from easyref.bench.manifest import BenchFormatError
from easyref.bench.runs import read_images, read_run_info
from easyref.errors import InvalidArgumentError
from easyref.files import atomic_write
from easyref.images import load_image
from easyref.shapes.world import ATTRIBUTES

JUDGE_SCORES = "judge.csv"
COLUMNS = ("group_id", "split", "kind", "hard", "references", "index",
           "concept_ok", "prompt_ok", "both", *(f"{name}_ok" for name in ATTRIBUTES))


def manifest_labels(manifest: str | Path) -> dict[str, dict]:
    """The ``shapes`` labels of every line of a ShapesWorld manifest, by group id."""
    labels = {}
    for number, line in enumerate(Path(manifest).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "shapes" not in record:
            raise BenchFormatError(f"{manifest} line {number}: no 'shapes' labels; is this a ShapesWorld manifest "
                                   f"(easyref shapes world)?")
        labels[record["id"]] = record["shapes"]
    return labels


def _names_to_indices(names: dict[str, str]) -> dict[str, int]:
    return {name: ATTRIBUTES[name].index(value) if isinstance(value, str) else int(value)
            for name, value in names.items()}


def score_run(run: str | Path, judge, manifest: str | Path | None = None) -> Path:
    """Judge every image of ``run`` against its group's labels; write ``RUN/judge.csv``."""
    from easyref.shapes.judge import score_images

    run = Path(run)
    manifest = Path(manifest) if manifest is not None else Path(read_run_info(run)["bench"])
    labels = manifest_labels(manifest)
    images = read_images(run)
    if not images:
        raise InvalidArgumentError(f"run {run} holds no images yet")
    by_group: dict[str, list] = {}
    for image in images:
        by_group.setdefault(image.group_id, []).append(image)
    rows = []
    for group_id, members in by_group.items():
        if group_id not in labels:
            raise BenchFormatError(f"run {run} has images of group {group_id}, which {manifest} does not hold")
        label = labels[group_id]
        scores = score_images(judge, [load_image(m.path) for m in members], _names_to_indices(label["concept"]),
                              _names_to_indices(label["prompt"]))
        for member, score in zip(members, scores, strict=True):
            rows.append({"group_id": group_id, "split": label["split"], "kind": label["kind"],
                         "hard": label["hard"] or "", "references": len(member.sidecar["references"]),
                         "index": member.sidecar["index"], **score})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(run / JUDGE_SCORES, lambda tmp: tmp.write_text(buffer.getvalue()))


def read_scores(run: str | Path) -> list[dict]:
    path = Path(run) / JUDGE_SCORES
    if not path.is_file():
        raise InvalidArgumentError(f"{run} has no {JUDGE_SCORES}; run 'easyref shapes score {run} --judge JUDGE_DIR' "
                                   f"first")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in list(row):
            if key.endswith("_ok") or key == "both":
                if row[key] == "":
                    del row[key]
                else:
                    row[key] = row[key] == "True"
    return rows


def summarize_run(run: str | Path, by: Sequence[str] = ("split",)) -> dict[str, dict]:
    """Means and group-bootstrap 95% intervals per value of ``by`` (e.g. split, or split and kind)."""
    from easyref.shapes.judge import summarize_scores

    rows = read_scores(run)
    out: dict[str, dict] = {}
    for key in sorted({tuple(row[name] for name in by) for row in rows}):
        members = [row for row in rows if tuple(row[name] for name in by) == key]
        out["/".join(key)] = summarize_scores(members)
    return out
