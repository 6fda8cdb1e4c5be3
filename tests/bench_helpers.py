"""Test helpers for the benchmark generation tests: tiny manifests, fast CPU maths in subprocesses."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from conftest import random_image


def write_manifest(folder: Path, reference_counts: Sequence[int], name: str = "bench.jsonl") -> Path:
    """A manifest of ``len(reference_counts)`` groups ``g0, g1, ...``, group i holding that many references."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, count in enumerate(reference_counts):
        refs = []
        for j in range(count):
            path = f"images/g{i}_r{j}.png"
            random_image(48 + 8 * j, 40 + 4 * i, seed=100 * i + j).save(folder / path)
            refs.append(path)
        random_image(64, 64, seed=100 * i + 99).save(folder / f"images/g{i}_target.png")
        lines.append(json.dumps({"id": f"g{i}", "split": "held-out" if i % 2 else "held-in", "domain": "test",
                                 "references": refs, "target": f"images/g{i}_target.png",
                                 "caption": f"a photo number {i}"}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


SITECUSTOMIZE = "import torch\ntorch.set_flush_denormal(True)\n"


def fast_cpu_env(folder: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` for a subprocess with conftest's ``fast_cpu_maths``: one thread, a ``sitecustomize`` that flushes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    paths = [str(folder), *filter(None, [env.get("PYTHONPATH")])]
    return {**env, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
