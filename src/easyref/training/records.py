"""The release's training data format: a JSON list of records, parsed and checked up front.

Three kinds of record, told apart by their keys::

    {"image_file": ["t.jpg"], "text": [...], "target": "t.jpg"}        # single: the target is its own reference
    {"image_file": ["a.jpg", "b.jpg"], "text": [...], "target": "t.jpg"}  # group: references + target
    {"face": [[x1, y1, x2, y2, score]], "text": [...], "target": "t.jpg"}  # face: reference = face crop of target

``text`` holds one or more captions (one is drawn at random per sample); a plain string counts
as one caption and an empty list as the empty caption. Paths are relative to an image root
unless absolute. Other keys are ignored, so the release's own files load unchanged.

Everything here is pure Python (no torch), so ``easyref data check`` answers before any model
is imported, and every problem names the record index and the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from easyref.files import read_json, resolve_under
from easyref.training.errors import DataFormatError

RecordKind = Literal["single", "group", "face"]
Box = tuple[float, float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Record:
    """One training example as the data file states it (paths not yet resolved)."""

    index: int
    target: str
    captions: tuple[str, ...]
    references: tuple[str, ...] = ()
    faces: tuple[Box, ...] = ()

    @property
    def kind(self) -> RecordKind:
        if self.faces:
            return "face"
        if self.references == (self.target,):
            return "single"
        return "group"

    def image_files(self) -> list[str]:
        """Every file the record reads: references first, then the target (no duplicates)."""
        return list(dict.fromkeys([*self.references, self.target]))

    def face(self) -> Box:
        """The face used as the reference: the record's first box, as the release takes it."""
        return self.faces[0]


def _strings(value: object, what: str, where: str, allow_empty: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataFormatError(f"{where}: '{what}' must be a string or a list of strings, got {_describe(value)}")
    if not allow_empty and (not value or not all(item.strip() for item in value)):
        raise DataFormatError(f"{where}: '{what}' must hold at least one non-empty path")
    return tuple(value)


def _describe(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, str, int, float, bool)) or value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _box(value: object, where: str, number: int) -> Box:
    if (not isinstance(value, list) or len(value) not in (4, 5)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise DataFormatError(f"{where}: face {number} must be [x1, y1, x2, y2] or [x1, y1, x2, y2, score] "
                              f"numbers, got {_describe(value)}")
    x1, y1, x2, y2 = (float(v) for v in value[:4])
    score = float(value[4]) if len(value) == 5 else 1.0
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2, score)):
        raise DataFormatError(f"{where}: face {number} has a non-finite number")
    if x2 <= x1 or y2 <= y1:
        raise DataFormatError(f"{where}: face {number} box {_describe(value)} is empty (needs x2 > x1 and y2 > y1)")
    return (x1, y1, x2, y2, score)


def parse_record(raw: object, index: int, source: str = "data") -> Record:
    """Check one record and return it; raise :class:`DataFormatError` naming ``index`` and the reason."""
    where = f"{source}: record {index}"
    if not isinstance(raw, dict):
        raise DataFormatError(f"{where}: must be a JSON object, got {_describe(raw)}")
    target = raw.get("target")
    if not isinstance(target, str) or not target.strip():
        raise DataFormatError(f"{where}: needs 'target', the path of the image to generate"
                              + ("" if "target" not in raw else f" (got {_describe(target)})"))
    if "text" not in raw:
        raise DataFormatError(f"{where}: needs 'text', a caption or a list of captions")
    captions = _strings(raw["text"], "text", where, allow_empty=True) or ("",)
    has_refs, has_faces = "image_file" in raw, "face" in raw
    if has_refs == has_faces:
        raise DataFormatError(f"{where}: needs exactly one of 'image_file' (reference images) and 'face' "
                              f"(face boxes in the target), got {'both' if has_refs else 'neither'}")
    if has_refs:
        return Record(index, target, captions, references=_strings(raw["image_file"], "image_file", where, False))
    faces = raw["face"]
    if not isinstance(faces, list) or not faces:
        raise DataFormatError(f"{where}: 'face' must be a non-empty list of boxes, got {_describe(faces)}")
    return Record(index, target, captions, faces=tuple(_box(box, where, i) for i, box in enumerate(faces)))


def parse_records(data: object, source: str = "data") -> list[Record]:
    """Check a whole data file's content (a JSON list) and return its records."""
    if not isinstance(data, list):
        raise DataFormatError(f"{source}: must be a JSON list of records, got a {type(data).__name__}")
    if not data:
        raise DataFormatError(f"{source}: holds no records")
    return [parse_record(raw, index, source) for index, raw in enumerate(data)]


def load_records(path: str | Path) -> list[Record]:
    """Read and check a data file; every problem is one :class:`DataFormatError` line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"data file {path} not found")
    data = read_json(path, DataFormatError)
    return parse_records(data, str(path))


def record_to_json(record: Record) -> dict:
    """The release's JSON object for ``record`` (what ``easyref data groups`` writes)."""
    out: dict = {"text": list(record.captions), "target": record.target}
    if record.faces:
        out["face"] = [list(box) for box in record.faces]
    else:
        out["image_file"] = list(record.references)
    return out


def resolve_path(path: str, image_root: Path | None, allow_absolute: bool = False) -> Path:
    """A record's path on disk, under ``image_root``: one that leaves it (``../``), or an absolute one
    unless ``allow_absolute``, raises :class:`~easyref.errors.OutsideRootError` before anything opens it.
    Without a root (the Python API's choice) paths are taken as they are."""
    if image_root is None:
        return Path(path).expanduser()
    return resolve_under(image_root, path, allow_absolute=allow_absolute)


def count_kinds(records: Sequence[Record]) -> dict[str, int]:
    counts = {"single": 0, "group": 0, "face": 0}
    for record in records:
        counts[record.kind] += 1
    return counts
