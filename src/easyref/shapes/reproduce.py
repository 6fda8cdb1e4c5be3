"""Everything ShapesWorld measures, from nothing, in one resumable run.

``easyref shapes reproduce OUTPUT`` runs these steps in order; each leaves a ``done.json`` with
its numbers, so an interrupted run continues where it stopped and a finished step is never
redone::

    OUTPUT/world/          the world (training records, held-in / held-out benchmark)
    OUTPUT/pretrained/     judge, clip, dino, base, mllm (+ work/ with checkpoints and logs)
    OUTPUT/summary.json    every number, for docs/SHAPESWORLD.md

``quick=True`` shrinks every training budget to a few steps (evaluations keep their size): the
same code paths, for checking an installation, with numbers that mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from easyref.files import write_json
from easyref.shapes.export import WorldSettings, write_world

PRETRAIN_ORDER = ("judge", "clip", "dino", "base", "mllm")
DONE = "done.json"
SUMMARY = "summary.json"
QUICK_WORLD = WorldSettings(pairs=16, crops=8, groups=8, train_references=3, held_in=4, held_out=6,
                            test_references=4, manifest_references=2)
QUICK_STEPS = 4


def pretrain_one(name: str, output: Path, steps: int | None, seed: int, progress: bool = True) -> dict:
    """Pretrain one model into ``output/name`` unless ``output/work/name/done.json`` says it is done.

    The base model needs the world's CLIP (its text encoders) and is evaluated by the judge.
    """
    done = output / "work" / name / DONE
    if done.is_file():
        return json.loads(done.read_text())
    (output / "work").mkdir(parents=True, exist_ok=True)
    common = {"steps": steps, "seed": seed, "progress": progress}
    if name == "judge":
        from easyref.shapes.judge import pretrain_judge
        summary = pretrain_judge(output / "judge", **common)
    elif name == "clip":
        from easyref.shapes.clip import pretrain_clip
        summary = pretrain_clip(output / "clip", **common)
    elif name == "dino":
        from easyref.shapes.dino import pretrain_dino
        summary = pretrain_dino(output / "dino", **common)
    elif name == "base":
        from easyref.errors import InvalidArgumentError
        if not (output / "work" / "clip" / DONE).is_file():
            raise InvalidArgumentError(f"the base model needs the world's CLIP first: "
                                       f"easyref shapes pretrain clip {output}")
        from easyref.shapes.base import pretrain_base
        judge = output / "judge" if (output / "work" / "judge" / DONE).is_file() else None
        summary = pretrain_base(output / "base", clip=output / "clip", judge=judge, **common)
    elif name == "mllm":
        from easyref.shapes.mllm import pretrain_mllm
        summary = pretrain_mllm(output / "mllm", **common)
    else:
        raise ValueError(f"unknown model {name!r}; one of {PRETRAIN_ORDER}")
    write_json(done, summary)
    return summary


def reproduce(output: str | Path, *, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Write the world, pretrain every model, and collect their numbers in ``OUTPUT/summary.json``."""
    from easyref.shapes.figures import example_groups_figure

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    world = write_world(output / "world", QUICK_WORLD if quick else WorldSettings(seed=seed), progress=progress)
    steps = QUICK_STEPS if quick else None
    models = {name: pretrain_one(name, output / "pretrained", steps, seed, progress) for name in PRETRAIN_ORDER}
    example_groups_figure(output / "shapesworld-groups.png", seed=seed)
    summary = {"quick": quick, "seed": seed, "world": world, "pretrained": models}
    write_json(output / SUMMARY, summary)
    return summary
