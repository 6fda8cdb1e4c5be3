"""``easyref shapes ...``: write the miniature world, pretrain its models, draw its figures.

Each sub-command sets ``handler`` (a function of the parsed arguments returning the exit status),
as the other command groups do. Long work shows a progress bar and is resumable: rerunning a
command skips what is complete and continues what was interrupted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from easyref.cli_options import add_verbose


def _command(subparsers, name: str, handler, help: str, description: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=description)
    add_verbose(parser)
    parser.set_defaults(handler=handler)
    return parser


def add_commands(subparsers) -> None:
    """Add ``shapes`` and its sub-commands to the ``easyref`` command's sub-parsers."""
    from easyref.shapes.export import WorldSettings

    shapes = subparsers.add_parser(
        "shapes", help="ShapesWorld: a miniature world to train and benchmark EasyRef on a CPU",
        description="ShapesWorld, a procedural world of coloured shapes small enough to train EasyRef and its "
                    "baselines end to end on a laptop CPU, with exact metrics (docs/SHAPESWORLD.md). Typical "
                    "order: world -> pretrain all -> (EasyRef training, benchmark).")
    add_verbose(shapes)
    commands = shapes.add_subparsers(dest="shapes_command", metavar="COMMAND", required=True)

    defaults = WorldSettings()
    world = _command(
        commands, "world", cmd_world, help="write the world: training records and the held-in/held-out benchmark",
        description="Render the world into OUTPUT: train/ (stage1.json pairs, stage2.json object crops, "
                    "stage3.json groups, in the release's training format, for 'easyref train'), held-in/ and "
                    "held-out/ group folders, and manifest.jsonl / manifest-all.jsonl for 'easyref bench'. "
                    "Deterministic: the same settings and seed give the same pixels. Rerunning continues an "
                    "interrupted run; other settings into the same folder are refused.")
    world.add_argument("output", metavar="OUTPUT", help="folder to write (created if missing)")
    for name, help_text in (("pairs", "image-caption pairs for stage align"),
                            ("crops", "object-crop records for stage single"),
                            ("groups", "training groups for stage multi"),
                            ("train-references", "references per training group"),
                            ("held-in", "held-in benchmark groups (training combinations, new renders)"),
                            ("held-out", "held-out benchmark groups (unseen combinations and the unseen 'scene' "
                                         "kind)"),
                            ("test-references", "references rendered per benchmark group (for scaling curves)"),
                            ("manifest-references", "references per group in manifest.jsonl"),
                            ("seed", "world seed")):
        attr = name.replace("-", "_")
        world.add_argument(f"--{name}", type=int, default=getattr(defaults, attr), metavar="N",
                           help=f"{help_text} (default: {getattr(defaults, attr)})")
    world.add_argument("--workers", type=int, default=None, metavar="N",
                       help="processes rendering in parallel (default: up to 2)")

    pretrain = _command(
        commands, "pretrain", cmd_pretrain, help="pretrain the world's judge, CLIP, DINO, base model and MLLM",
        description="Train ShapesWorld's own pretrained models into OUTPUT/<model>/ from fresh renders "
                    "(training combinations only, except the judge, which is the metric): 'judge' (attribute "
                    "classifier), 'clip' (CLIPModel), 'dino' (self-supervised Dinov2Model), 'base' (the SDXL "
                    "analogue; needs clip, evaluated by judge), 'mllm' (the Qwen2-VL analogue), or 'all' in that "
                    "order. Finished models are skipped; interrupted ones resume from OUTPUT/work/<model>/.")
    pretrain.add_argument("model", choices=("judge", "clip", "dino", "base", "mllm", "all"),
                          help="which model (or all)")
    pretrain.add_argument("output", metavar="OUTPUT", help="folder for the pretrained set")
    pretrain.add_argument("--steps", type=int, default=None, metavar="N",
                          help="training steps per model (default: each model's full budget; small values are "
                               "for a quick check)")
    pretrain.add_argument("--seed", type=int, default=0, metavar="N", help="training seed (default: 0)")
    pretrain.add_argument("--quick", action="store_true",
                          help="a few training steps and a small evaluation, as 'shapes reproduce --quick' uses: "
                               "checks that the step runs; the numbers mean nothing")

    reproduce = _command(
        commands, "reproduce", cmd_reproduce, help="everything, from nothing, in one resumable run",
        description="Run every ShapesWorld step into OUTPUT, several at once where one does not need another: "
                    "world/ (as 'shapes world'), pretrained/ (as 'shapes pretrain all'), experiments/ (EasyRef's "
                    "three stages, the aggregation and progressive-training ablations, the IP-Adapter, LoRA and "
                    "text-only baselines, each trained with 'easyref train' or 'easyref bench train-ip-adapter' "
                    "and benchmarked with 'easyref bench run'), RESULTS.md with images/, the float16 model "
                    "shapesworld/, summary.json with every measured number and timings.json with the wall time "
                    "of every run and step. Each finished step is skipped when the command is rerun, so an "
                    "interrupted run continues where it stopped.")
    reproduce.add_argument("output", metavar="OUTPUT", help="folder for everything (created if missing)")
    reproduce.add_argument("--quick", action="store_true",
                           help="tiny training budgets and evaluations everywhere: checks in a few minutes that "
                                "every step runs; the numbers mean nothing")
    reproduce.add_argument("--part-one", action="store_true",
                           help="stop after the world and the pretrained models (no EasyRef training)")
    reproduce.add_argument("--seed", type=int, default=0, metavar="N", help="world and training seed (default: 0)")
    reproduce.add_argument("--jobs", type=int, default=None, metavar="N",
                           help="steps run at once, each in its own process with cores/N torch threads "
                                "(default: one per core, at most 4); each step's output is in OUTPUT/logs/")

    examples = _command(
        commands, "examples", cmd_examples, help="write the example groups of the bundled model as image files",
        description="Write every example group that 'easyref generate --model shapesworld --example NAME' "
                    "uses into DIR/NAME/: ref-00.png ... (the references), target.png (an image of the concept "
                    "as the caption asks for it), caption.txt (the prompt) and concept.txt (what the references "
                    "share). They are rendered from the world's seed, the same pixels on every machine.")
    examples.add_argument("output", metavar="DIR", help="folder to write (created if missing)")

    score = _command(
        commands, "score", cmd_score, help="judge the images of benchmark runs on ShapesWorld",
        description="Read every image of each RUN folder (written by 'easyref bench run' on a ShapesWorld "
                    "manifest) with the judge: writes RUN/judge.csv (concept, prompt and per-attribute "
                    "correctness per image) and prints concept / prompt / both accuracy per split with "
                    "group-bootstrap 95%% intervals.")
    score.add_argument("runs", nargs="+", metavar="RUN", help="benchmark run folders")
    score.add_argument("--judge", required=True, metavar="DIR", help="judge folder (OUTPUT/pretrained/judge)")

    figure = _command(
        commands, "figure", cmd_figure, help="draw example groups of every split and kind as a PNG",
        description="Draw example groups (references | target, with caption and shared concept) of every split and "
                    "kind, hard cases included: the picture in docs/SHAPESWORLD.md.")
    figure.add_argument("output", metavar="FILE.png", help="image to write")
    figure.add_argument("--references", type=int, default=5, metavar="N", help="references per row (default: 5)")
    figure.add_argument("--seed", type=int, default=0, metavar="N", help="world seed (default: 0)")


def cmd_world(args: argparse.Namespace) -> int:
    from easyref.shapes.export import WorldSettings, write_world

    settings = WorldSettings(pairs=args.pairs, crops=args.crops, groups=args.groups,
                             train_references=args.train_references, held_in=args.held_in, held_out=args.held_out,
                             test_references=args.test_references, manifest_references=args.manifest_references,
                             seed=args.seed)
    write_world(args.output, settings, workers=args.workers, progress=True)
    print(f"wrote the world to {args.output}: train/stage1.json, stage2.json, stage3.json; manifest.jsonl")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from easyref.errors import InvalidArgumentError
    from easyref.shapes.reproduce import PRETRAIN_ORDER, QUICK_STEPS, pretrain_one

    if args.steps is not None and args.steps < 1:
        raise InvalidArgumentError(f"--steps must be at least 1, got {args.steps}")
    if args.quick and args.steps is not None:
        raise InvalidArgumentError("--quick sets its own number of steps; drop --steps or --quick")
    output = Path(args.output)
    steps = QUICK_STEPS if args.quick else args.steps
    for name in PRETRAIN_ORDER if args.model == "all" else (args.model,):
        summary = pretrain_one(name, output, steps, args.seed, progress=True, quick=args.quick)
        print(f"{name}: {json.dumps(summary, sort_keys=True)}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from easyref.errors import InvalidArgumentError
    from easyref.shapes.reproduce import SUMMARY, reproduce

    if args.jobs is not None and args.jobs < 1:
        raise InvalidArgumentError(f"--jobs must be at least 1, got {args.jobs}")
    reproduce(args.output, quick=args.quick, seed=args.seed, experiments=not args.part_one, jobs=args.jobs)
    print(f"done: every number is in {Path(args.output) / SUMMARY}")
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    from easyref.shapes.examples import example_names, write_example

    for name in example_names():
        folder = write_example(name, Path(args.output))
        print(f"{folder}: {(folder / 'caption.txt').read_text().strip()!r} (shared: "
              f"{(folder / 'concept.txt').read_text().strip()})")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from easyref.shapes.judge import ShapesJudge
    from easyref.shapes.scoring import score_run, summarize_run

    judge = ShapesJudge.from_pretrained(args.judge)
    for run in args.runs:
        score_run(run, judge)
        for split, summary in summarize_run(run).items():
            cells = ", ".join(f"{key[:-3] if key.endswith('_ok') else key} {value['mean']:.3f} "
                              f"[{value['low']:.3f}, {value['high']:.3f}]"
                              for key, value in summary.items() if key in ("concept_ok", "prompt_ok", "both"))
            print(f"{run} {split} ({summary['concept_ok']['groups']} groups): {cells}")
    return 0


def cmd_figure(args: argparse.Namespace) -> int:
    from easyref.shapes.figures import example_groups_figure

    example_groups_figure(args.output, references=args.references, seed=args.seed)
    print(f"wrote {args.output}")
    return 0
