"""Write ShapesWorld to disk in the formats the rest of easyref already reads.

Layout of a world folder::

    WORLD/world.json                   the settings that made it (a rerun with other settings refuses)
    WORLD/train/images/*.png           every training image
    WORLD/train/stage1.json            image-caption pairs, the target as its own reference (stage ``align``)
    WORLD/train/stage2.json            object crops of the target as the reference ("face" records, stage ``single``)
    WORLD/train/stage3.json            groups: references + target + caption (stage ``multi``)
    WORLD/held-in/GROUP/ref-NN.png, target.png      (and held-out/; each split also keeps groups.jsonl)
    WORLD/manifest.jsonl               MRBench manifest, the first ``manifest_references`` references of each group
    WORLD/manifest-all.jsonl           the same groups with every reference (for ``easyref bench scaling``)

The training JSON files are the release's format (``easyref train --data``); manifests are what
``easyref bench`` reads, each line extended with a ``shapes`` object (kind, hard case, concept and
prompt attributes) that the judge scores against. Every part is written into a temporary folder
and renamed when complete, so an interrupted run leaves whole parts only and a rerun skips them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from easyref.errors import InvalidArgumentError
from easyref.files import atomic_folder, atomic_write, write_json
from easyref.shapes.groups import Group, group_caption, sample_group
from easyref.shapes.splits import random_train_attributes
from easyref.shapes.world import Scene, bounding_box, clean_scene, render

WORLD_FILE = "world.json"
MANIFEST = "manifest.jsonl"
MANIFEST_ALL = "manifest-all.jsonl"
GROUPS = "groups.jsonl"  # a split's manifest lines (paths relative to the world folder), written with the split
TEST_SPLITS = ("held-in", "held-out")
WORLD_VERSION = 1


@dataclasses.dataclass(frozen=True)
class WorldSettings:
    """How much of the world to write. The defaults are what ``easyref shapes reproduce`` uses."""

    pairs: int = 12000
    crops: int = 6000
    groups: int = 6000
    train_references: int = 8
    held_in: int = 240
    held_out: int = 360
    test_references: int = 32
    manifest_references: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < (0 if field.name == "seed" else 1):
                raise InvalidArgumentError(f"{field.name} must be a positive integer, got {value!r}")
        if self.manifest_references > self.test_references:
            raise InvalidArgumentError("manifest_references cannot exceed test_references")


def _save(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, compress_level=1)


# -- training records (one function per record kind, each a pure function of its index) ---------------

def _pair(index: int, seed: int, folder: Path) -> dict:
    rng = np.random.default_rng([seed, 1, index])
    attributes = random_train_attributes(rng)
    name = f"images/pair-{index:06d}.png"
    _save(render(clean_scene(attributes, rng)), folder / name)
    # Several captions, one drawn per sample: the full description and the two partial group captions,
    # so stage 1 already pairs images with what group prompts look like.
    texts = [attributes.caption(), group_caption("identity", attributes), group_caption("style", attributes)]
    return {"image_file": [name], "text": texts, "target": name}


def _crop(index: int, seed: int, folder: Path) -> dict:
    rng = np.random.default_rng([seed, 2, index])
    attributes = random_train_attributes(rng)
    scene = clean_scene(attributes, rng)
    name = f"images/crop-{index:06d}.png"
    _save(render(scene), folder / name)
    x0, y0, x1, y1 = bounding_box(scene.objects[0])
    return {"face": [[x0, y0, x1, y1, 1.0]], "text": [group_caption("identity", attributes)], "target": name}


def _group(index: int, seed: int, folder: Path, references: int) -> dict:
    group = sample_group("train", index, references, seed)
    names = []
    for i, scene in enumerate(group.references):
        names.append(f"images/group-{index:06d}-ref-{i:02d}.png")
        _save(render(scene), folder / names[-1])
    target = f"images/group-{index:06d}-target.png"
    _save(render(group.target_scene), folder / target)
    return {"image_file": names, "text": [group.caption], "target": target, "kind": group.kind}


def _run(task: Callable[[int], dict], count: int, desc: str, workers: int, progress: bool) -> list[dict]:
    """Map ``task`` over range(count) in index order, on ``workers`` processes."""
    bar = tqdm(total=count, desc=desc, disable=not progress, dynamic_ncols=True)
    chunk = 256
    results: list[dict] = []
    if workers <= 1:
        for i in range(count):
            results.append(task(i))
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for record in pool.map(task, range(count), chunksize=chunk):
                results.append(record)
                bar.update(1)
    bar.close()
    return results


class _Task:
    """A picklable ``index -> record`` for the process pool."""

    def __init__(self, function, **kwargs) -> None:
        self.function, self.kwargs = function, kwargs

    def __call__(self, index: int) -> dict:
        return self.function(index, **self.kwargs)


def write_training_records(folder: Path, settings: WorldSettings, workers: int, progress: bool) -> None:
    with atomic_folder(folder) as staging:
        (staging / "images").mkdir()
        parts = (("stage1.json", _Task(_pair, seed=settings.seed, folder=staging), settings.pairs),
                 ("stage2.json", _Task(_crop, seed=settings.seed, folder=staging), settings.crops),
                 ("stage3.json", _Task(_group, seed=settings.seed, folder=staging,
                                       references=settings.train_references), settings.groups))
        for name, task, count in parts:
            records = _run(task, count, f"train {name}", workers, progress)
            (staging / name).write_text(json.dumps(records))


# -- test splits ---------------------------------------------------------------------------------------

def _write_group(index: int, split: str, seed: int, references: int, folder: Path) -> dict:
    group = sample_group(split, index, references, seed)
    group_folder = folder / group.id
    group_folder.mkdir()
    for i, scene in enumerate(group.references):
        _save(render(scene), group_folder / f"ref-{i:02d}.png")
    _save(render(group.target_scene), group_folder / "target.png")
    return manifest_line(group, f"{split}/{group.id}")


def manifest_line(group: Group, folder: str) -> dict:
    """One MRBench manifest record for ``group`` stored in ``folder`` (relative to the manifest)."""
    return {"id": group.id, "split": group.split, "domain": group.kind,
            "references": [f"{folder}/ref-{i:02d}.png" for i in range(len(group.references))],
            "target": f"{folder}/target.png", "caption": group.caption, "shapes": group.labels()}


def write_test_split(folder: Path, split: str, count: int, settings: WorldSettings, workers: int,
                     progress: bool) -> list[dict]:
    with atomic_folder(folder) as staging:
        task = _Task(_write_group, split=split, seed=settings.seed, references=settings.test_references,
                     folder=staging)
        lines = _run(task, count, split, workers, progress)
        (staging / GROUPS).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


def _write_manifest(path: Path, lines: Iterable[dict], references: int | None) -> None:
    text = "".join(json.dumps({**line, "references": line["references"][:references]}) + "\n" for line in lines)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_world(output: str | Path, settings: WorldSettings | None = None, *, workers: int | None = None,
                progress: bool = True) -> dict:
    """Write (or finish writing) a world folder; parts already complete are kept. Returns ``world.json``'s data."""
    settings = settings or WorldSettings()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    info = {"version": WORLD_VERSION, "settings": dataclasses.asdict(settings)}
    existing = output / WORLD_FILE
    if existing.is_file():
        found = json.loads(existing.read_text())
        if found != info:
            raise InvalidArgumentError(f"{output} holds a world written with other settings ({existing}); "
                                       f"choose another folder or delete it")
    else:
        write_json(existing, info)
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    if not (output / "train" / "stage3.json").is_file():
        write_training_records(output / "train", settings, workers, progress)
    lines = []
    for split, count in zip(TEST_SPLITS, (settings.held_in, settings.held_out), strict=True):
        folder = output / split
        if not (folder / GROUPS).is_file():
            write_test_split(folder, split, count, settings, workers, progress)
        lines += [json.loads(line) for line in (folder / GROUPS).read_text().splitlines()]
    _write_manifest(output / MANIFEST_ALL, lines, None)
    _write_manifest(output / MANIFEST, lines, settings.manifest_references)
    return info


def scene_image(scene: Scene) -> Image.Image:
    """A scene as a PIL image (what pipelines and processors take)."""
    return Image.fromarray(render(scene))
