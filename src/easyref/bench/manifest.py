"""The benchmark manifest: JSON lines, one group per line, paths relative to the manifest.

Each line: ``{"id", "split": "held-in"|"held-out", "domain", "references": [paths], "target":
path, "caption"}``. Loading validates everything up front (duplicate ids, missing files, empty
reference lists) so a long run never dies on line 900.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from easyref.errors import ModelFormatError

SPLITS = ("held-in", "held-out")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BenchFormatError(ModelFormatError):
    """A manifest or run folder is not in the benchmark's format."""


@dataclasses.dataclass(frozen=True)
class Group:
    """One benchmark item: references that share something, a held-back target and its caption."""

    id: str
    split: str
    domain: str
    references: tuple[Path, ...]
    target: Path
    caption: str

    def to_json(self, root: Path) -> dict:
        def rel(path: Path) -> str:
            try:
                return path.relative_to(root).as_posix()
            except ValueError:
                return str(path)

        return {"id": self.id, "split": self.split, "domain": self.domain,
                "references": [rel(p) for p in self.references], "target": rel(self.target),
                "caption": self.caption}


def _parse_line(line: str, number: int, root: Path, source: str, check_files: bool) -> Group:
    where = f"{source} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BenchFormatError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise BenchFormatError(f"{where}: expected a JSON object")
    missing = [key for key in ("id", "split", "domain", "references", "target", "caption") if key not in record]
    if missing:
        raise BenchFormatError(f"{where}: missing {', '.join(missing)}")
    group_id = record["id"]
    if not isinstance(group_id, str) or not _SAFE_ID.match(group_id):
        raise BenchFormatError(f"{where}: id {group_id!r} must be letters, digits, '.', '_' or '-'")
    if record["split"] not in SPLITS:
        raise BenchFormatError(f"{where}: split must be held-in or held-out, got {record['split']!r}")
    for key in ("domain", "caption", "target"):
        if not isinstance(record[key], str):
            raise BenchFormatError(f"{where}: {key} must be a string")
    refs = record["references"]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise BenchFormatError(f"{where}: references must be a non-empty list of paths")
    paths = tuple(root / r for r in refs)
    target = root / record["target"]
    if check_files:
        for path in (*paths, target):
            if not path.is_file():
                raise BenchFormatError(f"{where} (group {group_id}): missing file {path}")
    return Group(group_id, record["split"], record["domain"], paths, target, record["caption"])


def load_manifest(path: str | Path, check_files: bool = True) -> list[Group]:
    """Read and validate a manifest; every problem names the line and the group."""
    path = Path(path)
    if not path.is_file():
        raise BenchFormatError(f"benchmark manifest {path} does not exist")
    groups: list[Group] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        group = _parse_line(line, number, path.parent, str(path), check_files)
        if group.id in seen:
            raise BenchFormatError(f"{path} line {number}: duplicate id {group.id!r} (first on line {seen[group.id]})")
        seen[group.id] = number
        groups.append(group)
    if not groups:
        raise BenchFormatError(f"benchmark manifest {path} holds no groups")
    return groups


def manifest_digest(path: str | Path) -> str:
    """Identity of a benchmark: run folders remember it so scores never mix benchmarks."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
