"""Atomic writes, content hashes and reproducibility sidecars: one place for file output.

Every file easyref writes goes through :func:`atomic_write` so an interrupted run never leaves
a half-written image, embeds file or checkpoint behind: data lands in a temporary file in the
same folder and is renamed over the target only once complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from easyref.errors import FolderInUseError, OutputPathError, OutsideRootError

VERSIONED_PACKAGES = ("easyref", "torch", "diffusers", "transformers", "accelerate", "peft",
                      "safetensors", "huggingface_hub", "pillow")


def resolve_under(root: Path, name: str, *, allow_absolute: bool = False) -> Path:
    """``name`` from a data file, as a path under ``root``; refused before anything opens it if it
    leaves ``root`` (``..``) or is absolute (unless ``allow_absolute``). The check is on the path as
    written: symlinks inside ``root`` that the user placed there are followed as usual."""
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        if allow_absolute:
            return candidate
        raise OutsideRootError(f"{name} is an absolute path; paths in data files are relative to {root}")
    joined = Path(os.path.normpath(Path(root) / candidate))
    if not joined.is_relative_to(Path(os.path.normpath(root))):
        raise OutsideRootError(f"{name} leaves {root}")
    return joined


def check_output_path(path: str | Path) -> Path:
    """Fail early, before any model runs, if ``path`` cannot be written."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"output folder {folder} is not writable")
    if path.is_dir():
        raise OutputPathError(f"output path {path} is a folder, expected a file name")
    return path


def _usual_mode(full: int) -> int:
    """``full`` (0o666 for files, 0o777 for folders) less the process umask: what ``open`` or ``mkdir``
    would give. Temporary files and folders are private (0o600 / 0o700); what is published should not be."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


# -- temporaries -----------------------------------------------------------------------------------
# A temporary is named ``.<target>.<owner>.<random>.tmp...`` (or ``.old`` for a folder moved aside), where
# the owner is this host's tag and the writing process's pid. A process killed with -9 cannot remove its
# temporaries; the next writer of the same target can tell them from a live writer's and removes them.

def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _owner() -> str:
    return f"{_host_tag()}-{os.getpid()}"


_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)\.[^.]+\.(tmp|old)")


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, target: str | None = None) -> list[Path]:
    """Delete temporaries in ``folder`` (of ``target`` only, when given) whose writer on this host is no
    longer running; a live writer's, and those of other hosts (a shared filesystem), are left alone."""
    folder, removed, host = Path(folder), [], _host_tag()
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if (match is None or match["host"] != host or (target is not None and match["target"] != target)
                or _is_running(int(match["pid"]))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = check_output_path(path)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _usual_mode(0o666))
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def replace_folder(staging: str | Path, final: str | Path) -> Path:
    """Move a completely written ``staging`` folder onto ``final`` in one rename.

    An existing ``final`` is moved aside first and deleted only once the new folder is in place
    (put back if the move fails), so readers see the old folder or the new one, never a mix.
    """
    staging, final = Path(staging), Path(final)
    aside = _move_aside(final) if final.exists() else None
    try:
        os.replace(staging, final)
    except BaseException:
        if aside is not None:
            os.replace(aside / final.name, final)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return final


def _move_aside(folder: Path) -> Path:
    """Move ``folder`` into a new hidden temporary beside it (one rename); return the temporary."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{_owner()}.", suffix=".old", dir=folder.parent))
    os.replace(folder, aside / folder.name)
    return aside


def remove_folder(folder: str | Path) -> None:
    """Delete ``folder`` all at once for its readers: moved aside first, then removed, so a process killed
    half-way leaves a temporary (cleaned by the next writer), never a half folder."""
    shutil.rmtree(_move_aside(Path(folder)), ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    With ``replace=False`` an existing ``path`` is an error (``os.rename`` refuses a non-empty
    target), for folders that must be written exactly once.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent, path.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent))
    os.chmod(staging, _usual_mode(0o777))
    try:
        yield staging
        if replace:
            replace_folder(staging, path)
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# -- one writer per output folder -------------------------------------------------------------------
LOCK_FILE = ".easyref.lock"


def _read_lock(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def folder_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold ``folder/.easyref.lock`` (the holder's pid, host and command) while writing ``folder``.

    A second writer is refused with :class:`FolderInUseError` naming the holder: two runs in one
    folder interleave their logs and overwrite each other's checkpoints. A lock left by a process
    of this host that is no longer running is taken over with a notice on stderr; one from another
    host cannot be checked and is refused (the message says how to remove it).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _usual_mode(0o666))
        except FileExistsError:
            holder = _read_lock(lock)
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == me["host"] and not _is_running(pid):
                print(f"note: {folder} was locked by process {pid}, which is no longer running "
                      f"({holder.get('command', '?')}); taking it over", file=sys.stderr, flush=True)
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            who = (f"{holder.get('command', 'another easyref command')} (pid {pid} on {host}, since "
                   f"{holder.get('since', '?')})" if holder else "another easyref command")
            raise FolderInUseError(f"{folder} is in use by {who}; wait for it to finish or use another folder "
                                   f"(if that process is gone, delete {lock})") from None
        with os.fdopen(fd, "w") as out:
            json.dump(me, out)
        break
    try:
        yield lock
    finally:
        if _read_lock(lock).get("pid") == me["pid"]:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def parse_json(text: str, source: str, error: type[Exception]) -> Any:
    """``json.loads`` for files users give: every way it fails (bad syntax, nesting deeper than Python can
    decode) becomes one ``error`` naming ``source``, never a RecursionError from deep inside the decoder."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise error(f"{source}: JSON nested too deeply to read (over {sys.getrecursionlimit()} levels); "
                    "check that it is the right file") from None


def read_json(path: str | Path, error: type[Exception], source: str | None = None) -> Any:
    """A user's JSON file: :func:`parse_json` of its UTF-8 text, a file that is not UTF-8 being the same
    ``error`` naming it (``source``, default the path)."""
    source = source or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{source}: not a UTF-8 text file") from None
    return parse_json(text, source, error)


def write_json(path: str | Path, data: object) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of everything that changes the pixels, for the reproducibility sidecar."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
