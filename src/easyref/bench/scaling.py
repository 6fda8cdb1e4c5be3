"""``bench scaling``: cost (and, through ``bench score``, quality) as the reference group grows (paper Fig. 9).

For each size n, every group with at least n references is generated from its first n; groups
with fewer are skipped for that size. Each size is an ordinary run folder, ``DIR/size-<n>/``, so
``bench score`` and ``bench report`` read it like any other; its run.json settings and every
sidecar record the number of references used. ``DIR/scaling.csv`` holds, per size, how many
groups were generated and skipped and the median seconds per image.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from easyref.bench import runs
from easyref.bench.manifest import Group, load_manifest
from easyref.bench.methods import Method
from easyref.bench.runner import run_groups
from easyref.errors import InvalidArgumentError
from easyref.files import atomic_write

CSV_NAME = "scaling.csv"
CSV_COLUMNS = ("size", "groups", "skipped_groups", "seconds_per_image_median")


def size_folder(output: str | Path, size: int) -> Path:
    return Path(output) / f"size-{size}"


def first_references(groups: Sequence[Group], size: int) -> list[Group]:
    """The groups holding at least ``size`` references, each cut to its first ``size``."""
    return [dataclasses.replace(group, references=group.references[:size])
            for group in groups if len(group.references) >= size]


def median_seconds_per_image(run: Path) -> float | None:
    """Median over the run's groups of the generation time per image (one value per group)."""
    per_group = {image.group_id: image.sidecar["seconds_per_image"] for image in runs.read_images(run)}
    return statistics.median(per_group.values()) if per_group else None


def run_scaling(manifest: str | Path, method: Method, output: str | Path, sizes: Sequence[int], *,
                images_per_group: int = 1, seed: int = 0, limit: int | None = None,
                accelerator: Any = None) -> Path:
    """Generate one run folder per group size under ``output`` and write ``scaling.csv``; returns the csv.

    ``limit`` keeps the first ``limit`` eligible groups (by id) per size. Resumable like any run.
    """
    from accelerate import PartialState

    if not sizes or any(not isinstance(size, int) or size < 1 for size in sizes):
        raise InvalidArgumentError(f"sizes must be positive numbers of references, got {list(sizes)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InvalidArgumentError(f"limit must be a positive number of groups, got {limit}")
    state = accelerator if accelerator is not None else PartialState()
    manifest = Path(manifest).resolve()  # absolute paths in the sidecars, as in run_benchmark
    groups = sorted(load_manifest(manifest), key=lambda group: group.id)
    output = Path(output)
    rows = []
    for size in sorted(set(sizes)):
        eligible = first_references(groups, size)
        chosen = eligible[:limit]
        median = None
        if chosen:
            settings = {**method.settings(), "images_per_group": images_per_group, "base_seed": seed,
                        "references_per_group": size}
            run = run_groups(chosen, manifest, method, size_folder(output, size), images_per_group=images_per_group,
                             seed=seed, accelerator=state, settings=settings)
            median = median_seconds_per_image(run)
        rows.append({"size": size, "groups": len(chosen), "skipped_groups": len(groups) - len(eligible),
                     "seconds_per_image_median": "" if median is None else f"{median:.6g}"})
        if state.is_main_process:
            print(f"size {size}: {len(chosen)} groups generated, {len(groups) - len(eligible)} skipped "
                  "(fewer references)", file=sys.stderr, flush=True)
    path = output / CSV_NAME
    if state.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(path, lambda tmp: tmp.write_text(text.getvalue()))
    state.wait_for_everyone()
    return path
