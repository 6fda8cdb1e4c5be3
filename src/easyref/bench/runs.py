"""The run folder: what ``bench run`` writes and ``bench score``/``report``/``compare`` read.

Layout::

    RUN/run.json                    method, settings, benchmark path and digest
    RUN/images/<group_id>/<k>.png   generated image k of a group
    RUN/images/<group_id>/<k>.json  its sidecar: group fields, method, settings, seed, seconds

A group's images are written into a hidden temporary folder and renamed into place when all
of them are done, so a finished group is never regenerated and a crash leaves no partial group.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from easyref.bench.manifest import BenchFormatError, Group, manifest_digest
from easyref.files import atomic_folder, write_json

RUN_INFO = "run.json"
IMAGES = "images"


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    """One generated image of a run and its sidecar."""

    path: Path
    sidecar: dict

    @property
    def group_id(self) -> str:
        return self.sidecar["group_id"]


def open_run(folder: str | Path, manifest: str | Path, method: str, settings: dict) -> Path:
    """Create a run folder, or reopen one made for the same benchmark (to resume it)."""
    folder = Path(folder)
    digest = manifest_digest(manifest)
    info_path = folder / RUN_INFO
    if info_path.is_file():
        info = read_run_info(folder)
        if info.get("bench_sha256") != digest:
            raise BenchFormatError(f"run folder {folder} belongs to a different benchmark ({info.get('bench')})")
        if info.get("method") != method:
            raise BenchFormatError(f"run folder {folder} holds method {info.get('method')!r}, not {method!r}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / IMAGES).mkdir(exist_ok=True)
    write_json(info_path, {"bench": str(Path(manifest).resolve()), "bench_sha256": digest,
                           "method": method, "settings": settings})
    return folder


def read_run_info(folder: str | Path) -> dict:
    path = Path(folder) / RUN_INFO
    if not path.is_file():
        raise BenchFormatError(f"{folder} is not a benchmark run folder (no {RUN_INFO})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchFormatError(f"{path} is not valid JSON ({exc.msg})") from None


def group_folder(run: Path, group_id: str) -> Path:
    return Path(run) / IMAGES / group_id


def is_done(run: Path, group_id: str) -> bool:
    return group_folder(run, group_id).is_dir()


def write_group(run: Path, group: Group, images: Sequence[Image.Image], sidecars: Sequence[dict]) -> Path:
    """Write a group's images and sidecars all at once (temp folder, then rename)."""
    final = group_folder(run, group.id)
    with atomic_folder(final, replace=False) as tmp:
        for index, (image, sidecar) in enumerate(zip(images, sidecars, strict=True)):
            image.save(tmp / f"{index}.png")
            record = {"group_id": group.id, "split": group.split, "domain": group.domain,
                      "caption": group.caption, "target": str(group.target),
                      "references": [str(p) for p in group.references], "index": index, **sidecar}
            (tmp / f"{index}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return final


def read_images(run: str | Path) -> list[GeneratedImage]:
    """Every finished image of a run, in group then index order (temporary folders skipped)."""
    root = Path(run) / IMAGES
    read_run_info(run)
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for sidecar_path in sorted(folder.glob("*.json"), key=lambda p: int(p.stem)):
            image_path = sidecar_path.with_suffix(".png")
            if image_path.is_file():
                found.append(GeneratedImage(image_path, json.loads(sidecar_path.read_text())))
    return found
