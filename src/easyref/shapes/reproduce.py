"""Everything ShapesWorld measures, from nothing, in one resumable run.

``easyref shapes reproduce OUTPUT`` runs these steps, several at once where one does not need
another; each finished step leaves its model or run folder complete (the pretrained models a
``done.json`` with their numbers), so an interrupted run continues where it stopped and a finished
step is never redone::

    OUTPUT/world/          the world (training records, held-in / held-out benchmark)
    OUTPUT/pretrained/     judge, clip, dino, base, mllm (+ work/ with checkpoints and logs)
    OUTPUT/experiments/    EasyRef's stages, ablations and baselines, trained and benchmarked
    OUTPUT/logs/           each step's output
    OUTPUT/timings.json    the wall time of every invocation and step
    OUTPUT/summary.json    every number, for docs/SHAPESWORLD.md

``quick=True`` shrinks every training budget to a few steps and every evaluation to a handful of
items: the same code paths, for checking an installation, with numbers that mean nothing.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from easyref.files import write_json
from easyref.shapes.export import WorldSettings, write_world
from easyref.shapes.schedule import Step, command, default_jobs, run_steps

if TYPE_CHECKING:
    from easyref.shapes.experiments import Recipe

PRETRAIN_ORDER = ("judge", "clip", "dino", "base", "mllm")
DONE = "done.json"
SUMMARY = "summary.json"
TIMINGS = "timings.json"
QUICK_WORLD = WorldSettings(pairs=16, crops=8, groups=8, train_references=3, held_in=4, held_out=6,
                            test_references=4, manifest_references=2)
QUICK_STEPS = 4
# Evaluation sizes in quick mode (keyword arguments of each pretrain_<name>).
QUICK_EVALUATION = {
    "judge": {"eval_positives": 32, "eval_negatives": 8},
    "clip": {"eval_scenes": 16},
    "dino": {"eval_scenes": 16},
    "base": {"eval_captions": 4},
    "mllm": {"eval_groups": 4},
}


def pretrain_one(name: str, output: Path, steps: int | None, seed: int, progress: bool = True,
                 quick: bool = False) -> dict:
    """Pretrain one model into ``output/name`` unless ``output/work/name/done.json`` says it is done.

    The base model needs the world's CLIP (its text encoders) and is evaluated by the judge.
    ``quick`` also shrinks the model's evaluation to :data:`QUICK_EVALUATION`.
    """
    done = output / "work" / name / DONE
    if done.is_file():
        return json.loads(done.read_text())
    (output / "work").mkdir(parents=True, exist_ok=True)
    common = {"steps": steps, "seed": seed, "progress": progress, **(QUICK_EVALUATION[name] if quick else {})}
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
    done.parent.mkdir(parents=True, exist_ok=True)  # the base model's work folders are base-vae/ and base-unet/
    write_json(done, summary)
    return summary


def pretrain_step_name(model: str) -> str:
    return f"pretrain {model}"


def pretrain_steps(output: Path, seed: int, quick: bool) -> list[Step]:
    """One ``easyref shapes pretrain NAME`` step per model, listed longest chain first: the base model
    waits for the CLIP (its text encoders) and the judge (its evaluation)."""
    needs = {"base": (pretrain_step_name("clip"), pretrain_step_name("judge"))}
    steps = []
    for name in ("clip", "judge", "base", "mllm", "dino"):
        args = ["shapes", "pretrain", name, output, "--seed", seed] + (["--quick"] if quick else [])
        steps.append(Step(pretrain_step_name(name), functools.partial(command, args), after=needs.get(name, ()),
                          done=(output / "work" / name / DONE).is_file))
    return steps


def reproduce(output: str | Path, *, quick: bool = False, seed: int = 0, progress: bool = True,
              experiments: bool = True, jobs: int | None = None) -> dict:
    """Write the world, pretrain every model, train and benchmark EasyRef and its baselines, and
    collect every number: ``OUTPUT/summary.json``, ``OUTPUT/RESULTS.md`` (with ``OUTPUT/images/``)
    and the bundle-ready model ``OUTPUT/shapesworld/``. ``experiments=False`` stops after part 1.

    After the world, every step is an ``easyref`` command in its own process, ``jobs`` at a time
    (default: one per core, at most 4), with its output in ``OUTPUT/logs/``; ``OUTPUT/timings.json``
    adds up the wall time of every invocation."""
    from easyref.shapes.figures import example_groups_figure

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    world = write_world(output / "world", QUICK_WORLD if quick else WorldSettings(seed=seed), progress=progress)
    pretrained = output / "pretrained"
    steps = pretrain_steps(pretrained, seed, quick)
    if experiments:
        from easyref.shapes.experiments import Recipe, experiment_steps, write_subsets

        recipe = Recipe(seed=seed).quick() if quick else Recipe(seed=seed)
        write_subsets(output / "world")
        part_two, runs = experiment_steps(output / "experiments", output / "world", pretrained, recipe,
                                          made_by={name: pretrain_step_name(name) for name in PRETRAIN_ORDER})
        steps += part_two
    run_steps(steps, jobs=default_jobs() if jobs is None else jobs, logs=output / "logs", timings=output / TIMINGS,
              progress=progress)
    models = {name: json.loads((pretrained / "work" / name / DONE).read_text()) for name in PRETRAIN_ORDER}
    example_groups_figure(output / "shapesworld-groups.png", seed=seed)
    summary = {"quick": quick, "seed": seed, "world": world, "pretrained": models}
    if experiments:
        summary["experiments"] = report_part_two(output, runs, recipe, quick, seed)
    write_json(output / SUMMARY, summary)
    return summary


def report_part_two(output: Path, runs: dict[str, Path], recipe: Recipe, quick: bool, seed: int) -> dict:
    """RESULTS.md and its figures from the finished runs; the exported model."""
    from easyref.shapes.experiments import export_model
    from easyref.shapes.mllm import COND_IMAGE_SIZE, MERGE_SIZE, PATCH_SIZE
    from easyref.shapes.results import EXAMPLES_FIGURE, examples_figure, write_results

    pretrained, world = output / "pretrained", output / "world"
    per_image = (COND_IMAGE_SIZE // (PATCH_SIZE * MERGE_SIZE)) ** 2
    references = json.loads((world / "world.json").read_text())["settings"]["manifest_references"]
    tokens = {"easyref": str(recipe.reference_tokens), "easyref-average": str(recipe.reference_tokens),
              "easyref-concat": f"{references * per_image} ({references} x {per_image})"}
    command_line = f"easyref shapes reproduce OUTPUT{' --quick' if quick else ''} --seed {seed}"
    export_model(pretrained, output / "experiments" / "runs" / "multi" / "adapter", output / "shapesworld")
    examples_figure(output / "shapesworld", output / "images" / EXAMPLES_FIGURE)
    write_results(runs, output / "RESULTS.md", output / "images", command=command_line, tokens=tokens,
                  timings=json.loads((output / TIMINGS).read_text()))
    return {name: str(run) for name, run in runs.items()}
