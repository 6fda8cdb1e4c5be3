"""``bench run``: generate a method's images for every benchmark group into a run folder.

A run is meant to be long (a thousand groups, eight GPUs, interruptions), so it is built around
three promises:

* **Reproducible.** Each group's seed comes from the base seed and the group id alone
  (:func:`group_seed`), never from the manifest order, ``--limit``, the number of processes or
  how often the run was resumed; every method sees the same seed for the same group.
* **Resumable, never partial.** Finished groups (``runs.is_done``) are skipped; a group's images
  appear all at once (``runs.write_group``), so a crash leaves only finished groups behind.
* **Each group exactly once across processes.** Under ``accelerate launch`` the groups, sorted by
  id, are dealt out by index modulo the number of processes: a fixed partition that every
  process computes alike, whatever has been done already.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from easyref.bench import runs
from easyref.bench.manifest import BenchFormatError, Group, load_manifest
from easyref.bench.methods import Method
from easyref.errors import InvalidArgumentError
from easyref.files import folder_lock
from easyref.pipeline import MAX_IMAGES_PER_CALL


def group_seed(base_seed: int, group_id: str) -> int:
    """The seed of one group: the first 8 bytes of ``sha256(f"{base_seed}/{group_id}")``, as 63 bits.

    Hashing (rather than ``base_seed + index``) keeps a group's seed fixed when the manifest is
    reordered, extended or cut with ``--limit``, and makes neighbouring groups' seeds unrelated.
    """
    digest = hashlib.sha256(f"{base_seed}/{group_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def shard(groups: Sequence[Group], process_index: int, num_processes: int) -> list[Group]:
    """This process's groups: every ``num_processes``-th of the groups sorted by id."""
    return sorted(groups, key=lambda group: group.id)[process_index::num_processes]


def _open_checked(output: Path, manifest: Path, name: str, settings: dict[str, Any]) -> Path:
    """``runs.open_run``, and refuse to resume a run made with other settings (its images would mix)."""
    run = runs.open_run(output, manifest, name, settings)
    stored = runs.read_run_info(run).get("settings")
    wanted = json.loads(json.dumps(settings))
    if stored != wanted:
        differing = sorted(key for key in set(stored or {}) | set(wanted)
                           if (stored or {}).get(key) != wanted.get(key))
        raise BenchFormatError(f"run folder {output} was made with different settings ({', '.join(differing)}); "
                               "use a new --output, or the same settings to resume it")
    return run


def _count_done(run: Path, ids: set[str]) -> int:
    """Finished groups of this run, whichever process wrote them (the progress bar shows them all)."""
    folder = run / runs.IMAGES
    return sum(1 for path in folder.iterdir() if path.name in ids and path.is_dir())


def run_groups(groups: Sequence[Group], manifest: str | Path, method: Method, output: str | Path, *,
               images_per_group: int = 1, seed: int = 0, accelerator: Any = None,
               settings: dict[str, Any] | None = None) -> Path:
    """Generate ``groups`` (this process's shard of them) into the run folder ``output``.

    ``settings`` (default: the method's, plus ``images_per_group`` and ``base_seed``) go into
    run.json and every sidecar. ``accelerator`` is an ``accelerate`` ``Accelerator`` or
    ``PartialState``; by default the current launch's. Returns the run folder once every process
    has finished.
    """
    from accelerate import PartialState

    if not isinstance(images_per_group, int) or not 1 <= images_per_group <= MAX_IMAGES_PER_CALL:
        raise InvalidArgumentError(f"images per group must be between 1 and {MAX_IMAGES_PER_CALL}, "
                                   f"got {images_per_group}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidArgumentError(f"seed must be a non-negative integer, got {seed}")
    state = accelerator if accelerator is not None else PartialState()
    manifest, output = Path(manifest), Path(output)
    if settings is None:
        settings = {**method.settings(), "images_per_group": images_per_group, "base_seed": seed}
    # One run per output folder: the main process holds its lock (the launch's other processes share it),
    # creates the folder first; the others then find it and check it.
    with contextlib.ExitStack() as held:
        if state.is_main_process:
            held.enter_context(folder_lock(output, f"easyref bench run --method {method.name}"))
            run = _open_checked(output, manifest, method.name, settings)
        state.wait_for_everyone()
        if not state.is_main_process:
            run = _open_checked(output, manifest, method.name, settings)
        _generate_shard(groups, method, run, state, settings, seed, images_per_group)
    return run


def _generate_shard(groups: Sequence[Group], method: Method, run: Path, state: Any, settings: dict[str, Any],
                    seed: int, images_per_group: int) -> None:
    ids = {group.id for group in groups}
    mine = [group for group in shard(groups, state.process_index, state.num_processes)
            if not runs.is_done(run, group.id)]
    bar = tqdm(total=len(groups), initial=_count_done(run, ids), desc=f"{method.name} {run.name}", unit="group",
               disable=not state.is_main_process, dynamic_ncols=True)
    try:
        for group in mine:
            images, sidecar = _generate_group(method, group, seed, images_per_group)
            sidecar.update(settings=settings, process_index=state.process_index,
                           num_processes=state.num_processes)
            runs.write_group(run, group, images, [dict(sidecar) for _ in images])
            bar.update(_count_done(run, ids) - bar.n)
        state.wait_for_everyone()
        bar.update(_count_done(run, ids) - bar.n)
    finally:
        bar.close()


def _generate_group(method: Method, group: Group, base_seed: int, num_images: int) -> tuple[list, dict[str, Any]]:
    """One group's images and the sidecar fields that describe how they were made."""
    seed = group_seed(base_seed, group.id)
    start = time.perf_counter()
    method.prepare(group, seed)
    tuned = time.perf_counter()
    images = method.generate(group, seed, num_images)
    seconds = time.perf_counter() - tuned
    if len(images) != num_images:
        raise RuntimeError(f"method {method.name} returned {len(images)} images for group {group.id}, "
                           f"expected {num_images}")
    sidecar: dict[str, Any] = {"method": method.name, "seed": seed, "base_seed": base_seed,
                               "num_references": len(group.references), "seconds_per_image": seconds / num_images}
    if method.tunes:
        sidecar["tuning_seconds"] = tuned - start
    return images, sidecar


def run_benchmark(manifest: str | Path, method: Method, output: str | Path, images_per_group: int = 1,
                  seed: int = 0, limit: int | None = None, accelerator: Any = None) -> Path:
    """Run ``method`` over a benchmark manifest (its first ``limit`` groups by id) into ``output``.

    Safe to call again on the same folder: finished groups are kept, the rest are generated. A
    folder made for another benchmark, method or settings is refused.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InvalidArgumentError(f"limit must be a positive number of groups, got {limit}")
    # Resolved, so the sidecars' reference and target paths do not depend on the working folder.
    manifest = Path(manifest).resolve()
    groups = sorted(load_manifest(manifest), key=lambda group: group.id)[:limit]
    return run_groups(groups, manifest, method, output, images_per_group=images_per_group, seed=seed,
                      accelerator=accelerator)
