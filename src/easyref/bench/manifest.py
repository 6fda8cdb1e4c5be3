"""The benchmark manifest: JSON lines, one group per line, paths relative to the manifest.

Each line: ``{"id", "split": "held-in"|"held-out"|"coco", "domain", "references": [paths],
"target": path, "caption"}``. Loading validates everything up front (duplicate ids, missing
files, empty reference lists) so a long run never dies on line 900.

Two builders write manifests: :func:`build_manifest` from a folder of groups (MRBench-style,
paper Table 3) and :func:`load_coco` + :func:`write_manifest` from COCO captions (the paper's
single-reference protocol, Table 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from easyref.config import MAX_REFERENCES
from easyref.errors import EasyRefError, InvalidArgumentError, ModelFormatError, OutsideRootError
from easyref.files import atomic_write, parse_json, read_json, resolve_under
from easyref.images import IMAGE_SUFFIXES, load_references

# "coco" is the single-reference protocol (paper Table 2): neither seen nor unseen domains.
SPLITS = ("held-in", "held-out", "coco")
COCO = "coco"
CAPTION_TXT = "caption.txt"
CAPTIONS_JSON = "captions.json"
_MAX_ID = 128
_SAFE_ID = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{_MAX_ID - 1}}}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

log = logging.getLogger(__name__)


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


def _id_problem(group_id: object) -> str:
    """Why ``group_id`` is not a usable id (it names a folder of every run), said exactly."""
    if not isinstance(group_id, str):
        return f"id must be a string, got {type(group_id).__name__}"
    if len(group_id) > _MAX_ID:
        return f"id is {len(group_id)} characters long; at most {_MAX_ID}"
    if not group_id or not group_id[0].isascii() or not group_id[0].isalnum():
        return f"id {group_id!r} must start with a letter or a digit"
    return f"id {group_id!r} may hold only letters, digits, '.', '_' and '-'"


def _parse_line(line: str, number: int, root: Path, source: str, check_files: bool) -> Group:
    where = f"{source} line {number}"
    record = parse_json(line, where, BenchFormatError)
    if not isinstance(record, dict):
        raise BenchFormatError(f"{where}: expected a JSON object")
    missing = [key for key in ("id", "split", "domain", "references", "target", "caption") if key not in record]
    if missing:
        raise BenchFormatError(f"{where}: missing {', '.join(missing)}")
    group_id = record["id"]
    if not isinstance(group_id, str) or not _SAFE_ID.match(group_id):
        raise BenchFormatError(f"{where}: {_id_problem(group_id)}")
    if record["split"] not in SPLITS:
        raise BenchFormatError(f"{where}: split must be one of {', '.join(SPLITS)}, got {record['split']!r}")
    for key in ("domain", "caption", "target"):
        if not isinstance(record[key], str):
            raise BenchFormatError(f"{where}: {key} must be a string")
    refs = record["references"]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise BenchFormatError(f"{where}: references must be a non-empty list of paths")
    try:  # relative paths stay inside the manifest's folder; absolute ones ('bench coco' writes them) are explicit
        paths = tuple(resolve_under(root, r, allow_absolute=True) for r in refs)
        target = resolve_under(root, record["target"], allow_absolute=True)
    except OutsideRootError as exc:
        raise BenchFormatError(f"{where} (group {group_id}): {exc}") from None
    if check_files:
        for path in (*paths, target):
            if not path.is_file():
                raise BenchFormatError(f"{where} (group {group_id}): missing file {path}")
    return Group(group_id, record["split"], record["domain"], paths, target, record["caption"])


def check_references(groups: Sequence[Group], max_references: int = MAX_REFERENCES) -> None:
    """Open and decode every reference of ``groups`` before any model loads, so that a bad image stops the run
    at once with the group named, not half-way through a long run."""
    for group in tqdm(groups, desc="checking references", unit="group", disable=len(groups) < 100,
                      dynamic_ncols=True):
        try:
            load_references(list(group.references), max_references)
        except EasyRefError as exc:
            raise BenchFormatError(f"group {group.id}: {exc}") from None


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


def write_manifest(groups: Sequence[Group], output: str | Path) -> Path:
    """Write ``groups`` as a manifest, atomically; paths inside the manifest's folder become relative."""
    output = Path(output)
    if not groups:
        raise BenchFormatError(f"no groups to write to {output}")
    duplicates = sorted(i for i, n in Counter(group.id for group in groups).items() if n > 1)
    if duplicates:
        raise BenchFormatError(f"duplicate group ids: {', '.join(duplicates)}")
    root = output.resolve().parent
    text = "".join(json.dumps(group.to_json(root)) + "\n" for group in groups)
    return atomic_write(output, lambda tmp: tmp.write_text(text))


def safe_id(text: str) -> str:
    """Turn folder names into a manifest id: runs of other characters become '_', at most 128 long."""
    cleaned = _UNSAFE_CHARS.sub("_", text).lstrip("._-")[:_MAX_ID]
    if not cleaned:
        raise BenchFormatError(f"cannot make a group id from {text!r}: it has no letters or digits")
    return cleaned


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _target_caption(group_folder: Path, target: Path) -> str:
    """The target's caption: ``captions.json`` entry for its file name, else ``caption.txt``, else ''."""
    captions_path = group_folder / CAPTIONS_JSON
    if captions_path.is_file():
        captions = read_json(captions_path, BenchFormatError)
        if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
            raise BenchFormatError(f"{captions_path}: expected an object {{file name: caption string}}")
        if target.name in captions:
            return captions[target.name].strip()
    caption_path = group_folder / CAPTION_TXT
    if caption_path.is_file():
        return caption_path.read_text(encoding="utf-8").strip()
    return ""


def build_manifest(folder: str | Path, output: str | Path, held_out_domains: Sequence[str]) -> Path:
    """Write a manifest for a folder of groups laid out as ``FOLDER/<domain>/<group>/<images>``.

    * Images: files directly in a group folder whose suffix is one of ``IMAGE_SUFFIXES`` (any
      case), hidden files skipped, sorted by file name. They are not decoded here (a folder of
      thousands would take minutes); ``bench run`` validates each one as it loads it.
    * Target: the LAST image by sorted file name; the others are the references. Rename files
      (e.g. ``zz_target.png``) to choose the target; a fixed rule keeps rebuilds identical.
    * Caption of the target: the entry for its file name in the group folder's
      ``captions.json`` (``{"file name": "caption"}``), else the text of ``caption.txt`` in the
      group folder (whitespace stripped), else empty (CLIP-T is then meaningless for that group;
      the count of such groups is logged as a warning).
    * Groups with fewer than 2 images cannot hold a reference and a target: they are skipped and
      their count is logged as a warning.
    * Split: ``held-out`` for domains named in ``held_out_domains`` (which must all exist, so a
      typo cannot silently turn a zero-shot test into a seen-domain one), else ``held-in``.
    * Id: ``<domain>-<group>`` with characters other than letters, digits, '.', '_', '-' replaced.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BenchFormatError(f"benchmark folder {folder} does not exist")
    domains = _subfolders(folder)
    if not domains:
        raise BenchFormatError(f"benchmark folder {folder} has no domain folders (expected FOLDER/<domain>/<group>/)")
    unknown = sorted(set(held_out_domains) - {d.name for d in domains})
    if unknown:
        raise InvalidArgumentError(
            f"held-out domain(s) {', '.join(unknown)} not found in {folder} "
            f"(domains: {', '.join(d.name for d in domains)})")
    groups: list[Group] = []
    sources: dict[str, Path] = {}
    skipped = uncaptioned = 0
    for domain in domains:
        split = "held-out" if domain.name in held_out_domains else "held-in"
        for group_folder in _subfolders(domain):
            images = sorted((p for p in group_folder.iterdir() if p.is_file() and not p.name.startswith(".")
                             and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
            if len(images) < 2:
                skipped += 1
                continue
            group_id = safe_id(f"{domain.name}-{group_folder.name}")
            if group_id in sources:
                raise BenchFormatError(
                    f"group folders {sources[group_id]} and {group_folder} both give the id {group_id!r}; rename one")
            sources[group_id] = group_folder
            caption = _target_caption(group_folder, images[-1])
            uncaptioned += not caption
            resolved = [p.resolve() for p in images]
            groups.append(Group(group_id, split, domain.name, tuple(resolved[:-1]), resolved[-1], caption))
    if skipped:
        log.warning("skipped %d group(s) with fewer than 2 images", skipped)
    if uncaptioned:
        log.warning("%d group(s) have no caption for their target (no %s entry or %s)",
                    uncaptioned, CAPTIONS_JSON, CAPTION_TXT)
    if not groups:
        raise BenchFormatError(f"no group in {folder} has 2 or more images")
    return write_manifest(groups, output)


def load_coco(captions_json: str | Path, image_dir: str | Path, limit: int | None = None) -> list[Group]:
    """Single-reference groups from COCO captions (paper Table 2): each image is its own reference
    and target, its first caption (in annotation order) the prompt.

    ``captions_json`` is a COCO captions file (``{"images": [{"id", "file_name"}], "annotations":
    [{"image_id", "caption"}]}``, e.g. ``captions_val2017.json``). Images are taken in increasing
    id order, the first ``limit`` of those that have a caption; each chosen file must exist in
    ``image_dir``. Ids are ``coco-<image id>``; split and domain are ``coco``.
    """
    captions_json, image_dir = Path(captions_json), Path(image_dir)
    if limit is not None and limit < 1:
        raise InvalidArgumentError(f"limit must be at least 1, got {limit}")
    if not image_dir.is_dir():
        raise BenchFormatError(f"COCO image folder {image_dir} does not exist")
    try:
        data = read_json(captions_json, BenchFormatError)
    except FileNotFoundError:
        raise BenchFormatError(f"COCO captions file {captions_json} does not exist") from None
    try:
        files = {int(image["id"]): str(image["file_name"]) for image in data["images"]}
        captions: dict[int, str] = {}
        for note in data["annotations"]:
            captions.setdefault(int(note["image_id"]), str(note["caption"]).strip())
    except (TypeError, KeyError, ValueError) as exc:
        raise BenchFormatError(
            f"{captions_json}: not a COCO captions file (needs images[].id/file_name and "
            f"annotations[].image_id/caption; problem: {exc!r})") from None
    chosen = [image_id for image_id in sorted(files) if captions.get(image_id)][:limit]
    if not chosen:
        raise BenchFormatError(f"{captions_json}: no image has a caption")
    groups = []
    for image_id in chosen:
        path = (image_dir / files[image_id]).resolve()
        if not path.is_file():
            raise BenchFormatError(f"COCO image {image_id}: missing file {path}")
        groups.append(Group(f"coco-{image_id}", COCO, COCO, (path,), path, captions[image_id]))
    return groups
