"""``easyref data groups`` and ``easyref data check``: training data made and checked before any GPU time.

``groups`` turns a folder of folders (one folder per group of images showing the same thing)
into the release's JSON: every image of a group becomes once the target, the group's other
images its references. Captions come from a sidecar ``IMAGE.txt`` (one caption per line) or
the group's ``captions.json`` (``{"a.jpg": "caption" or ["caption", ...]}``), else none.

``check`` reads every image a data file names, as training would, and counts what training
would trip over: missing, unreadable or too-small images, unreadable targets, records left
without a usable reference, face boxes outside their image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from easyref.errors import ImageError, InvalidArgumentError, OutsideRootError
from easyref.files import read_json, write_json
from easyref.images import IMAGE_SUFFIXES, load_image
from easyref.training.errors import DataFormatError
from easyref.training.records import Record, count_kinds, load_records, resolve_path

CAPTIONS_FILE = "captions.json"
MIN_GROUP_SIZE = 2


# -- data groups ------------------------------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)


def _read_captions_file(folder: Path) -> dict[str, list[str]]:
    path = folder / CAPTIONS_FILE
    if not path.is_file():
        return {}
    data = read_json(path, DataFormatError)
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: must map image file names to a caption or a list of captions")
    captions = {}
    for name, value in data.items():
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise DataFormatError(f"{path}: the captions of {name!r} must be a string or a list of strings")
        captions[name] = value
    return captions


def _captions(image: Path, from_file: dict[str, list[str]]) -> list[str]:
    sidecar = image.with_suffix(".txt")
    if sidecar.is_file():
        return [line.strip() for line in sidecar.read_text(encoding="utf-8", errors="replace").splitlines()
                if line.strip()]
    return list(from_file.get(image.name, []))


def build_groups(folder: str | Path) -> tuple[list[dict], list[str]]:
    """(records in the release's format, notes on what was skipped) for a folder of group folders.

    Paths in the records are relative to ``folder`` (train with ``--image-root folder``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidArgumentError(f"{folder} is not a folder")
    records, notes = [], []
    loose = _image_files(folder)
    if loose:
        notes.append(f"ignored {len(loose)} image(s) directly in {folder} (each group needs its own folder)")
    for group in sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name):
        images = _image_files(group)
        if len(images) < MIN_GROUP_SIZE:
            notes.append(f"skipped group {group.name}: {len(images)} image(s), a group needs at least "
                         f"{MIN_GROUP_SIZE}")
            continue
        from_file = _read_captions_file(group)
        names = [f"{group.name}/{image.name}" for image in images]
        for image, name in zip(images, names, strict=True):
            records.append({"image_file": [other for other in names if other != name],
                            "text": _captions(image, from_file), "target": name})
    if not records:
        raise InvalidArgumentError(f"{folder} holds no group folder with at least {MIN_GROUP_SIZE} images")
    return records, notes


def write_groups(folder: str | Path, output: str | Path) -> tuple[int, list[str]]:
    """Write the records of :func:`build_groups` to ``output``; return (record count, notes)."""
    records, notes = build_groups(folder)
    write_json(output, records)
    return len(records), notes


# -- data check -------------------------------------------------------------------------------------

@dataclasses.dataclass
class CheckReport:
    records: int = 0
    kinds: dict[str, int] = dataclasses.field(default_factory=dict)
    images: int = 0
    outside: dict[str, str] = dataclasses.field(default_factory=dict)
    missing: list[str] = dataclasses.field(default_factory=list)
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)
    too_small: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    bad_target: list[int] = dataclasses.field(default_factory=list)
    no_references: list[int] = dataclasses.field(default_factory=list)
    face_outside: list[int] = dataclasses.field(default_factory=list)
    usable: int = 0
    min_size: int = 0

    @property
    def problems(self) -> int:
        images = len(self.outside) + len(self.missing) + len(self.unreadable) + len(self.too_small)
        return images + self.records - self.usable

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "problems": self.problems}

    def lines(self) -> list[str]:
        def example(items: Sequence[str] | dict) -> str:
            if not items:
                return ""
            first = next(iter(items))
            detail = items[first] if isinstance(items, dict) else None
            if isinstance(detail, list):
                detail = "x".join(map(str, detail))
            return f"   e.g. {first}" + (f" ({detail})" if detail else "")

        def indices(items: list[int]) -> str:
            if not items:
                return ""
            shown = ", ".join(map(str, items[:5])) + (", ..." if len(items) > 5 else "")
            return f"   (record{'s' if len(items) > 1 else ''} {shown})"

        kinds = ", ".join(f"{count} {kind}" for kind, count in self.kinds.items())
        rows = [
            ("paths outside the image root", len(self.outside), example(list(self.outside))),
            ("images missing", len(self.missing), example(self.missing)),
            ("images unreadable", len(self.unreadable), example(self.unreadable)),
            (f"images too small (< {self.min_size} px)", len(self.too_small), example(self.too_small)),
            ("records with an unusable target", len(self.bad_target), indices(self.bad_target)),
            ("records with no usable reference", len(self.no_references), indices(self.no_references)),
            ("records with a face box outside", len(self.face_outside), indices(self.face_outside)),
        ]
        return [
            f"{self.records} records ({kinds}), {self.images} distinct images",
            *(f"{label + ':':<36}{count:>7}{detail}" for label, count, detail in rows),
            f"{'usable records:':<36}{self.usable:>7} of {self.records}",
            "no problems found" if not self.problems else f"{self.problems} problem(s) found",
        ]


def _inspect(name: str, image_root: Path | None, allow_absolute: bool) -> tuple[str, object]:
    """("ok", (w, h)) / ("outside", message) / ("missing", message) / ("unreadable", message), reading the
    image as training does; a path outside the root is never looked at."""
    try:
        path = resolve_path(name, image_root, allow_absolute)
    except OutsideRootError as exc:
        return "outside", str(exc)
    if not path.exists():
        return "missing", "file not found"
    try:
        with load_image(path) as image:
            return "ok", image.size
    except ImageError as exc:
        return "unreadable", str(exc).removeprefix(f"{path}: ")


def _face_inside(box, size: tuple[int, int]) -> bool:
    width, height = size
    return min(width, box[2]) - max(0, box[0]) >= 1 and min(height, box[3]) - max(0, box[1]) >= 1


def check_records(records: Sequence[Record], image_root: Path | None, min_size: int = 256,
                  workers: int = 8, allow_absolute: bool = False) -> CheckReport:
    """Open every image the records name (in ``workers`` threads) and count the problems."""
    names = list(dict.fromkeys(name for record in records for name in record.image_files()))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = dict(zip(names, pool.map(lambda name: _inspect(name, image_root, allow_absolute), names),
                           strict=True))
    report = CheckReport(records=len(records), kinds=count_kinds(records), images=len(names), min_size=min_size)
    for name, (status, detail) in results.items():
        if status == "outside":
            report.outside[name] = detail
        elif status == "missing":
            report.missing.append(name)
        elif status == "unreadable":
            report.unreadable[name] = detail
        elif min(detail) < min_size:
            report.too_small[name] = list(detail)
    for record in records:
        status, detail = results[record.target]
        if status != "ok":
            report.bad_target.append(record.index)
        elif record.kind == "face" and not _face_inside(record.face(), detail):
            report.face_outside.append(record.index)
        elif record.kind == "group" and not any(results[ref][0] == "ok" for ref in record.references):
            report.no_references.append(record.index)
        else:
            report.usable += 1
    return report


def check_data(data: str | Path, image_root: str | Path | None = None, min_size: int = 256,
               workers: int = 8, allow_absolute: bool = False) -> CheckReport:
    """Parse ``data`` (format errors raise, naming the record) and check its images."""
    if min_size < 1:
        raise InvalidArgumentError(f"--min-size must be a positive number of pixels, got {min_size}")
    records = load_records(data)
    root = Path(image_root) if image_root is not None else Path(data).absolute().parent
    if not root.is_dir():
        raise InvalidArgumentError(f"--image-root {root} is not a folder")
    return check_records(records, root, min_size, workers, allow_absolute)
