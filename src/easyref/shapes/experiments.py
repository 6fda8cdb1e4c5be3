"""ShapesWorld part 2: EasyRef and its baselines trained and benchmarked with the project's own commands.

Every step is the command a user would type, run as a subprocess (``python -m easyref ...``):
``easyref train`` for EasyRef's three stages and the ablations, ``easyref bench train-ip-adapter``
for the IP-Adapter baseline, ``easyref bench run`` / ``bench scaling`` for the benchmark. Each
writes its own resumable folder, so when the steps of :func:`experiment_steps` are run again after an
interruption they continue where they stopped and never redo finished work::

    OUT/runs/<model>/<stage>/      training runs (adapter/ when finished)
    OUT/runs/ip-adapter/           the IP-Adapter baseline
    OUT/bench/<method>/            benchmark run folders, judged into judge.csv, scores.csv
                                   (scored.json once generated and scored in full)

The recipe is the release's (trainable sets per stage, drop rates, truncation, constant learning
rate, learning rates in the release's 5 : 2 : 1 ratio) scaled to the miniature: 64 px targets,
56 px references, 16 reference tokens, a rank-8 LoRA, and learning rates 10x the release's because
the models are ~1000x smaller (with gradients clipped at norm 1, which the release does not need).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from easyref.files import atomic_write, write_json
from easyref.shapes.schedule import Step, command

BENCH_MANIFEST = "manifest.jsonl"
SCORED = "scored.json"
SCALING_MANIFEST = "manifest-all.jsonl"


@dataclasses.dataclass(frozen=True)
class StageBudget:
    """Steps, samples per step and learning rate of one training run."""

    steps: int
    batch: int
    learning_rate: float


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything the experiments train and sample with; the defaults are the full run."""

    resolution: int = 64
    cond_image_size: int = 56
    reference_tokens: int = 16
    lora_rank: int = 8
    align: StageBudget = StageBudget(steps=1200, batch=16, learning_rate=1e-3)
    single: StageBudget = StageBudget(steps=300, batch=8, learning_rate=4e-4)
    multi: StageBudget = StageBudget(steps=900, batch=8, learning_rate=2e-4)
    ip_adapter: StageBudget = StageBudget(steps=1200, batch=16, learning_rate=1e-3)
    lora: StageBudget = StageBudget(steps=500, batch=1, learning_rate=1e-3)  # per group, as bench run tunes it
    max_grad_norm: float = 1.0  # the release does not clip; at 10x its learning rates a clip keeps steps sane
    sampling_steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0

    def quick(self, steps: int = 2) -> Recipe:
        """Every budget cut to ``steps`` steps of 2 samples: the same commands, for checking an install."""
        small = {name: StageBudget(steps, 2, getattr(self, name).learning_rate)
                 for name in ("align", "single", "multi", "ip_adapter", "lora")}
        return dataclasses.replace(self, sampling_steps=2, **small)


# Which stages each trained model runs, and the aggregation of its last stage (paper Table 5 trains
# each variant; the progressive-training ablation drops stage single). Models name the stages
# they share: a variant reuses the finished adapters of the stages before its own.
MODELS: dict[str, tuple[tuple[str, str, str], ...]] = {
    # model: ((stage, run folder, aggregation), ...)
    "easyref": (("align", "align", "tokens"), ("single", "single", "tokens"), ("multi", "multi", "tokens")),
    "easyref-average": (("align", "align", "tokens"), ("single", "single", "tokens"),
                        ("multi", "multi-average", "average")),
    "easyref-concat": (("align", "align", "tokens"), ("single", "single", "tokens"),
                       ("multi", "multi-concat", "concat")),
    "easyref-no-single": (("align", "align", "tokens"), ("multi", "multi-no-single", "tokens")),
    "easyref-multi-only": (("multi", "multi-only", "tokens"),),
}


def _fresh_or_resumed(run: Path) -> list[str]:
    """``--resume latest`` for a run folder with a checkpoint; a folder without one is started over."""
    if any(run.glob("checkpoint-*")):
        return ["--resume", "latest"]
    if run.exists():
        shutil.rmtree(run)
    return []


def stage_trained(run: Path) -> bool:
    """Has the ``easyref train`` run in ``run`` written its final adapter?"""
    return (run / "adapter" / "config.json").is_file()


def ip_adapter_trained(run: Path) -> bool:
    """Has ``easyref bench train-ip-adapter`` into ``run`` written its final weights?"""
    return (run / "ip-adapter").is_dir()


def train_stage(stage: str, run: Path, data: Path, pretrained: Path, budget: StageBudget, recipe: Recipe, *,
                init: Path | None = None, aggregation: str = "tokens") -> None:
    """One ``easyref train`` run into ``run`` (its final adapter: ``run/adapter``); skipped when trained."""
    if stage_trained(run):
        return
    args = ["train", "--stage", stage, "--base", pretrained / "base", "--mllm", pretrained / "mllm",
            "--data", data, "--output", run, "--resolution", recipe.resolution,
            "--max-steps", budget.steps, "--batch-size", budget.batch, "--gradient-accumulation-steps", 1,
            "--learning-rate", budget.learning_rate, "--save-steps", max(1, budget.steps // 4),
            "--max-grad-norm", recipe.max_grad_norm, "--num-workers", 0, "--seed", recipe.seed,
            "--aggregation", aggregation, "--negative-prompt", ""]
    if init is None:
        args += ["--num-reference-tokens", recipe.reference_tokens, "--cond-image-size", recipe.cond_image_size]
        if stage != "align":
            args += ["--skip-earlier-stages"]
    else:
        args += ["--init", init]
    if stage != "align":
        args += ["--lora-rank", recipe.lora_rank]
    command(args + _fresh_or_resumed(run))


def train_ip_adapter(world: Path, pretrained: Path, run: Path, recipe: Recipe) -> None:
    """The IP-Adapter baseline on the same image-caption pairs, image encoder = the world CLIP, into
    ``run`` (its weights: ``run/ip-adapter``); skipped when trained."""
    if ip_adapter_trained(run):
        return
    budget = recipe.ip_adapter
    command(["bench", "train-ip-adapter", "--base", pretrained / "base", "--image-encoder", pretrained / "clip",
             "--data", world / "train" / "stage1.json", "--output", run, "--max-steps", budget.steps,
             "--batch-size", budget.batch, "--learning-rate", budget.learning_rate,
             "--resolution", recipe.resolution, "--seed", recipe.seed])


def sampling_args(recipe: Recipe) -> list:
    return ["--steps", recipe.sampling_steps, "--guidance-scale", recipe.guidance_scale,
            "--height", recipe.resolution, "--width", recipe.resolution, "--seed", recipe.seed]


def method_args(method: str, pretrained: Path, *, adapter: Path | None = None,
                ip_adapter: Path | None = None) -> list:
    """``bench run`` arguments selecting a method and its model parts."""
    args = ["--method", method, "--base", pretrained / "base"]
    if method == "easyref":
        args += ["--mllm", pretrained / "mllm", "--adapter", adapter]
    elif method == "ip-adapter":
        args += ["--ip-adapter", ip_adapter]
    return args


def bench_run(output: Path, manifest: Path, method: Sequence, recipe: Recipe) -> None:
    """``easyref bench run`` into ``output`` (resumes; finished groups are kept)."""
    command(["bench", "run", "--bench", manifest, "--output", output, *method, *sampling_args(recipe)])


def subset_manifest(source: Path, target: Path, per_split_kind: int) -> Path:
    """The first ``per_split_kind`` groups of every (split, kind) of ``source``, written to ``target``.

    ``bench run --limit`` keeps the first groups *by id*, which are all of one split and kind; the
    costly measurements (scaling curves, per-group LoRA) need every split and kind instead.
    ``target`` must sit beside ``source``: the lines' image paths are relative to the file.
    """
    if target.parent.resolve() != source.parent.resolve():
        raise ValueError("a subset manifest must sit beside its source (relative image paths)")
    kept, counts = [], {}
    for line in source.read_text().splitlines():
        if not line.strip():
            continue
        labels = json.loads(line)["shapes"]
        key = (labels["split"], labels["kind"])
        counts[key] = counts.get(key, 0) + 1
        if counts[key] <= per_split_kind:
            kept.append(line)
    atomic_write(target, lambda tmp: tmp.write_text("\n".join(kept) + "\n"))
    return target


def score(run: Path, pretrained: Path) -> None:
    """Judge every image of ``run`` (``judge.csv``) and add CLIP-I / CLIP-T / DINO-I computed with the
    world's own encoders (``scores.csv``)."""
    command(["shapes", "score", "--judge", pretrained / "judge", run])
    command(["bench", "score", "--clip", pretrained / "clip", "--dino", pretrained / "dino", run])


def mark_scored(folder: Path) -> None:
    """Mark a benchmark folder generated and scored in full: a rerun skips it (delete the mark to redo
    the scores, e.g. after changing the judge)."""
    write_json(folder / SCORED, {"scored": True})


# Benchmark runs: method -> trained model (None for the baselines). Ordered by what matters most,
# so an interrupted run has the main comparison first.
BENCH_METHODS = ("easyref", "text-only", "ip-adapter", "easyref-average", "easyref-concat", "easyref-no-single",
                 "easyref-multi-only")
SCALING_METHODS = ("easyref", "ip-adapter")
SCALING_SIZES = (1, 2, 4, 8, 16, 32)
SCALING_GROUPS = 10   # per split and kind
LORA_GROUPS = 3       # per split and kind: per-group LoRA tunes a model for every group


def stage_runs(name: str, runs: Path) -> list[tuple[str, Path, Path | None, str]]:
    """The training runs of model ``name`` of :data:`MODELS`: (stage, run folder, adapter it starts from,
    aggregation) each. Variants name the same folders for the stages they share."""
    stages, init = [], None
    for stage, folder, aggregation in MODELS[name]:
        stages.append((stage, runs / folder, init, aggregation))
        init = runs / folder / "adapter"
    return stages


def _train_step_name(run: Path) -> str:
    return f"train {run.name}"


def experiment_steps(output: Path, world: Path, pretrained: Path, recipe: Recipe, *,
                     methods: Sequence[str] = BENCH_METHODS, scaling: bool = True, lora: bool = True,
                     made_by: Mapping[str, str] | None = None) -> tuple[list[Step], dict[str, Path]]:
    """The steps that train every model ``methods`` needs, benchmark and score them; and the run folders
    they fill, by name. ``made_by`` names the step that makes each pretrained model (``judge``, ``clip``,
    ``dino``, ``base``, ``mllm``) when it is part of the same run: a step waits only for the models it
    uses (training: the base and the MLLM or the CLIP; scoring: the judge, the CLIP and the DINO).

    ``OUT/bench/<method>`` runs the whole benchmark manifest (4 references per group);
    ``OUT/scaling/<method>`` the scaling subset at every size of :data:`SCALING_SIZES`;
    ``OUT/bench/lora`` per-group LoRA on a small subset (it trains for every group).
    Steps are listed by what matters most and by the length of what waits on them, so the main
    comparison comes first and the long training chain starts early.
    """
    runs_dir, bench_dir = output / "runs", output / "bench"
    manifest = world / BENCH_MANIFEST
    data = {"align": world / "train" / "stage1.json", "single": world / "train" / "stage2.json",
            "multi": world / "train" / "stage3.json"}
    made_by = made_by or {}

    def needing(*models: str) -> tuple[str, ...]:
        return tuple(made_by[model] for model in models if model in made_by)

    scorers = needing("judge", "clip", "dino")
    steps: dict[str, Step] = {}
    runs: dict[str, Path] = {}

    def train_steps(model: str) -> tuple[str, Path]:
        """Add the training steps of ``model``; its last step's name and its final adapter."""
        name, needs = "", needing("base", "mllm")
        for stage, run, init, aggregation in stage_runs(model, runs_dir):
            name = _train_step_name(run)
            steps.setdefault(name, Step(
                name, functools.partial(train_stage, stage, run, data[stage], pretrained, getattr(recipe, stage),
                                        recipe, init=init, aggregation=aggregation),
                after=needs, done=functools.partial(stage_trained, run)))
            needs = (name,)
        return name, run / "adapter"

    def ip_adapter_step() -> tuple[str, Path]:
        run = runs_dir / "ip-adapter"
        name = _train_step_name(run)
        steps.setdefault(name, Step(name, functools.partial(train_ip_adapter, world, pretrained, run, recipe),
                                    after=needing("base", "clip"), done=functools.partial(ip_adapter_trained, run)))
        return name, run / "ip-adapter"

    def bench_step(method: str, folder: Path, source: Path, args: list, needs: tuple[str, ...]) -> None:
        def bench() -> None:
            bench_run(folder, source, args, recipe)
            score(folder, pretrained)
            mark_scored(folder)
        steps[f"bench {method}"] = Step(f"bench {method}", bench, after=needs + scorers,
                                        done=(folder / SCORED).is_file)
        runs[method] = folder

    for method in methods:
        if method.startswith("easyref"):
            trained, adapter = train_steps(method)
            bench_step(method, bench_dir / method, manifest, method_args("easyref", pretrained, adapter=adapter),
                       (trained,))
        elif method == "ip-adapter":
            trained, weights = ip_adapter_step()
            bench_step(method, bench_dir / method, manifest,
                       method_args("ip-adapter", pretrained, ip_adapter=weights), (trained,))
        else:
            bench_step(method, bench_dir / method, manifest, method_args(method, pretrained), needing("base"))
    if scaling:
        rendered = json.loads((world / "world.json").read_text())["settings"]["test_references"]
        sizes = [size for size in SCALING_SIZES if size <= rendered]
        for method in SCALING_METHODS:
            if method == "easyref":
                trained, adapter = train_steps("easyref")
                args = method_args("easyref", pretrained, adapter=adapter)
            else:
                trained, weights = ip_adapter_step()
                args = method_args("ip-adapter", pretrained, ip_adapter=weights)
            folder = output / "scaling" / method
            steps[f"scaling {method}"] = Step(f"scaling {method}", functools.partial(
                scaling_run, folder, world, args, recipe, sizes, pretrained), after=(trained, *needing("judge")),
                done=(folder / SCORED).is_file)
            runs.update({f"scaling/{method}/{size}": folder / f"size-{size}" for size in sizes})
    if lora:
        lora_args = method_args("lora", pretrained) + [
            "--lora-resolution", recipe.resolution, "--lora-rank", recipe.lora_rank,
            "--lora-steps", recipe.lora.steps, "--lora-lr", recipe.lora.learning_rate]
        bench_step("lora", bench_dir / "lora", world / "manifest-lora.jsonl", lora_args, needing("base"))
    return list(steps.values()), runs


def scaling_run(folder: Path, world: Path, method: Sequence, recipe: Recipe, sizes: Sequence[int],
                pretrained: Path) -> None:
    """``easyref bench scaling`` on the scaling subset, every size judged (the curves are the judge's only)."""
    subset = world / "manifest-scaling.jsonl"
    command(["bench", "scaling", "--bench", subset, "--output", folder, *method, *sampling_args(recipe),
             "--sizes", *sizes])
    command(["shapes", "score", "--judge", pretrained / "judge", *(folder / f"size-{n}" for n in sizes)])
    mark_scored(folder)


def write_subsets(world: Path) -> None:
    """The scaling and per-group LoRA subsets of the benchmark, beside its manifests."""
    subset_manifest(world / SCALING_MANIFEST, world / "manifest-scaling.jsonl", SCALING_GROUPS)
    subset_manifest(world / BENCH_MANIFEST, world / "manifest-lora.jsonl", LORA_GROUPS)


def export_model(pretrained: Path, adapter: Path, folder: Path) -> Path:
    """The trained EasyRef as one model folder (``base/``, ``mllm/``, ``adapter/``) in float16, plus the
    world's ``judge/`` to score what it makes: what the package bundles as ``shapesworld``. Loading
    upcasts to the device's dtype (float32 on a CPU)."""
    import torch

    from easyref.files import atomic_folder
    from easyref.pipeline import EasyRefPipeline

    pipe = EasyRefPipeline.from_pretrained(base=pretrained / "base", mllm=pretrained / "mllm", adapter=adapter,
                                           device="cpu")
    pipe.to(dtype=torch.float16)
    with atomic_folder(folder) as staging:
        pipe.save_pretrained(staging)
        shutil.copytree(pretrained / "judge", staging / "judge")
    return folder
