"""The output folder of a run: its identity (``run.json``), checkpoints and the final adapter.

Layout::

    OUTPUT/run.json              what makes this run this run (checked on every start)
    OUTPUT/checkpoint-STEP/      accelerate state (trainable weights, optimizer, scheduler, RNG of
                                 every process) + training_state.json (step, data position, counts)
    OUTPUT/adapter/              the final adapter, loadable by `easyref generate --adapter`
    OUTPUT/log.jsonl             one JSON object per logged step
    OUTPUT/validation/           step-STEP.png grids

A checkpoint is written into ``.checkpoint-STEP.tmp`` and renamed when complete, so a run killed
while saving leaves no half checkpoint that ``--resume latest`` could pick. The output folder must
be visible to every process (a shared filesystem on multi-node runs).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from easyref.errors import OutputPathError, first_line
from easyref.files import LOCK_FILE, read_json, remove_folder, remove_stale_temporaries, replace_folder, write_json
from easyref.training.errors import RunMismatchError

RUN_FILE = "run.json"
STATE_FILE = "training_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_FOLDER = "adapter"
_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_PARTIAL = re.compile(rf"^\.({CHECKPOINT_PREFIX}\d+|{ADAPTER_FOLDER})\..*tmp$")


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those holding training_state.json), oldest first."""
    if not output.is_dir():
        return []
    found = []
    for entry in output.iterdir():
        match = _CHECKPOINT.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def resolve_resume(output: Path, resume: str | None) -> Path | None:
    """``latest`` → newest checkpoint of ``output`` (None if there is none yet); else a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume).expanduser().absolute()
    if not (path / STATE_FILE).is_file():
        raise RunMismatchError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE}); "
                               f"give 'latest' or OUTPUT/{CHECKPOINT_PREFIX}STEP")
    return path


def broken(checkpoint: Path, exc: BaseException) -> str:
    """What to tell a user whose checkpoint cannot be loaded: which one, why, and where to resume instead."""
    reason = first_line(exc)
    earlier = [path for step, path in list_checkpoints(checkpoint.parent) if step < _step(checkpoint)]
    advice = (f"resume from the one before it with --resume {earlier[-1]}" if earlier
              else "there is no earlier checkpoint: start again with a new --output")
    return f"checkpoint {checkpoint} is damaged and cannot be loaded ({reason}); {advice}"


def _step(checkpoint: Path) -> int:
    match = _CHECKPOINT.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def read_state(checkpoint: Path) -> dict[str, Any]:
    return read_json(checkpoint / STATE_FILE, RunMismatchError)


# The settings a user most likely changed by mistake come first in the message.
_FIRST = ("stage", "model", "base", "mllm", "init", "data", "image_root", "num_processes", "batch_size",
          "gradient_accumulation_steps", "learning_rate", "resolution", "seed")


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(before) | set(now), key=lambda key: (key not in _FIRST, _FIRST.index(key)
                                                           if key in _FIRST else 0, key))
    return [f"{key}: {before.get(key)!r} → {now.get(key)!r}" for key in keys if before.get(key) != now.get(key)]


def check_output(output: Path, identity: dict[str, Any], resume: str | None) -> None:
    """Refuse an output folder that holds something else, a different run, or an unresumed run.

    A run that stopped before saving anything (no checkpoint, no adapter) may be started again with
    other settings. Read-only, so every process can run it and fail the same way.
    """
    if output.exists() and not output.is_dir():
        raise OutputPathError(f"--output {output} is a file; give a folder")
    if not output.exists():
        return
    run_file = output / RUN_FILE
    if not run_file.is_file():
        if any(entry for entry in output.iterdir() if not _PARTIAL.match(entry.name) and entry.name != LOCK_FILE):
            raise RunMismatchError(f"--output {output} holds files but no {RUN_FILE}: it is not an easyref "
                                   "training run; give a new or empty folder")
        return
    try:
        before = read_json(run_file, RunMismatchError)
    except RunMismatchError:
        raise RunMismatchError(f"{run_file} is not valid JSON; give a new --output folder") from None
    changes = _differences(before, identity)
    checkpoints = list_checkpoints(output)
    if changes and (checkpoints or (output / ADAPTER_FOLDER).exists()):
        shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
        raise RunMismatchError(f"--output {output} holds a different run ({shown}); use a new --output, "
                               "or the same settings to resume it")
    if checkpoints and resume is None:
        raise RunMismatchError(f"--output {output} already has checkpoints up to step {checkpoints[-1][0]}: "
                               "pass --resume latest to continue that run, or give a new --output")


def write_run_file(output: Path, identity: dict[str, Any]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / RUN_FILE, identity)


def remove_partial(output: Path, keep: int) -> None:
    """Finish what a run killed while saving left: delete half-written checkpoints and other stale
    temporaries, and prune to the ``keep`` newest checkpoints (a kill during pruning left one more)."""
    if output.is_dir():
        for entry in output.iterdir():
            if _PARTIAL.match(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
        remove_stale_temporaries(output)
        _prune(output, keep)


def _prune(output: Path, keep: int) -> None:
    for _, old in list_checkpoints(output)[:-keep]:
        remove_folder(old)


def temp_checkpoint(output: Path, step: int) -> Path:
    return output / f".{CHECKPOINT_PREFIX}{step}.tmp"


def publish_checkpoint(output: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Finish a checkpoint written into :func:`temp_checkpoint`: state file, rename, prune to ``keep``."""
    temp = temp_checkpoint(output, step)
    write_json(temp / STATE_FILE, state)
    final = replace_folder(temp, output / f"{CHECKPOINT_PREFIX}{step}")
    _prune(output, keep)
    return final
