"""The ``train`` and ``data`` subcommands, added to any argparse command line by :func:`add_commands`.

Each subcommand sets ``handler`` (a function ``args -> exit status``) and, for the ``easyref``
CLI's convention, ``func`` (``(args, argv) -> exit status``). Nothing heavy is imported until a
handler runs, so ``easyref --help`` stays instant.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from easyref.cli_options import add_model_options, add_verbose

TRAIN_EXAMPLES = """\
examples:
  easyref train --stage align  --model MODEL_DIR --data pairs.json \\
      --image-root IMGS --output runs/s1
  easyref train --stage single --model MODEL_DIR --init runs/s1/adapter --data faces.json \\
      --image-root IMGS --output runs/s2
  easyref train --stage multi  --model MODEL_DIR --init runs/s2/adapter --data groups.json \\
      --image-root IMGS --output runs/s3
  accelerate launch --num_processes 8 -m easyref train ...                  # same command, 8 GPUs
  accelerate launch --config_file configs/deepspeed_zero2.yaml -m easyref train ...
"""


def _cli(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace, list], int]:
    def func(args: argparse.Namespace, argv: list | None = None) -> int:
        return handler(args)

    return func


def _set_handler(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int]) -> None:
    parser.set_defaults(handler=handler, func=_cli(handler))


def add_commands(subparsers) -> None:
    """Add ``train`` and ``data`` (``data groups``, ``data check``) to an argparse subparsers object."""
    _add_train(subparsers)
    _add_data(subparsers)


# -- train --------------------------------------------------------------------------------------------

def _add_train(subparsers) -> None:
    from easyref.config import RELEASE_NEGATIVE_PROMPT
    from easyref.training.options import CROPS, Augmentations, TrainOptions
    from easyref.training.stages import STAGES

    train = subparsers.add_parser(
        "train", help="train EasyRef (stage align, single or multi) on one CPU or many GPUs",
        # The raw formatter keeps the examples' layout, so the description is wrapped here, as argparse
        # wraps every other command's.
        description=textwrap.fill(
            "Train one stage of EasyRef's progressive training: 'align' (image-text pairs; trains the "
            "final-layer copy, reference tokens, projection and adapter), 'single' (adds face crops; also the "
            "whole MLLM and a UNet LoRA) and 'multi' (groups; same parts as 'single'). Writes "
            "OUTPUT/checkpoint-STEP/ every --save-steps, OUTPUT/log.jsonl and the final OUTPUT/adapter/ that "
            "'easyref generate --adapter' loads. Under 'accelerate launch' the same command runs on many "
            "processes, GPUs or machines.", width=78, break_on_hyphens=False),
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --stage {align,single,multi} (--model DIR | --base DIR_OR_FILE --mllm DIR)\n"
              "       [--init ADAPTER] --data FILE.json [--image-root DIR] --output DIR [options]",
    )
    add_verbose(train)
    train.add_argument("--stage", required=True, choices=STAGES, help="training stage")
    model = add_model_options(train, adapter=False)
    model.add_argument("--init", metavar="ADAPTER_DIR",
                       help="adapter to start from: required for 'single' (stage-1 RUN/adapter) and 'multi' "
                            "(stage-2 RUN/adapter); optional for 'align' (default: a new adapter)")
    model.add_argument("--aggregation", choices=("tokens", "average", "concat"),
                       help="how a group becomes tokens (paper Table 5): 'tokens' (EasyRef), 'average' (each "
                            "reference alone, reference-token outputs averaged), 'concat' (the final layer's outputs "
                            "at every image token). Given with --init, training continues the same parameters under "
                            "this aggregation (default: the --init adapter's, else tokens)")
    model.add_argument("--skip-earlier-stages", action="store_true",
                       help="start stage single or multi from a new adapter instead of --init (the paper's "
                            "progressive-training ablation; the release always continues from the previous stage)")
    model.add_argument("--negative-prompt", metavar="TEXT",
                       help="text negative prompt the trained adapter uses when a generation names none: "
                            "validation images here and 'easyref generate' later; '' for a base that never saw "
                            f"the release's words (default: the --init adapter's, else the release's "
                            f"'{RELEASE_NEGATIVE_PROMPT}')")
    model.add_argument("--lora-rank", type=int, metavar="R",
                       help="UNet LoRA rank for stages single and multi (default: the --init adapter's, else 128)")
    fresh = train.add_argument_group("a new adapter (stage align without --init)")
    fresh.add_argument("--num-reference-tokens", type=int, metavar="N", help="reference tokens (default: 64)")
    fresh.add_argument("--num-final-layers", type=int, metavar="K", help="final layers copied (default: 1)")
    fresh.add_argument("--cond-image-size", type=int, metavar="PX",
                       help="references are resized to about PX² pixels, a multiple of 28 (default: 336)")
    fresh.add_argument("--reference-attention", choices=("bidirectional", "causal"),
                       help="attention among reference tokens (default: bidirectional)")
    data = train.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="FILE.json", help="training records in the release's format")
    data.add_argument("--image-root", metavar="DIR",
                      help="folder the records' relative image paths start from (default: the data file's folder)")
    data.add_argument("--allow-absolute-paths", action="store_true",
                      help="accept absolute image paths in the records (default: every path is relative to "
                           "--image-root, and one that leaves it is skipped and counted)")
    data.add_argument("--num-workers", metavar="N", type=int, default=4, help="data loading processes (default: 4)")
    aug = train.add_argument_group("augmentation (defaults: the release's)")
    aug.add_argument("--max-references", metavar="N", type=int, default=Augmentations.max_references,
                     help=f"references kept per group (default: {Augmentations.max_references})")
    aug.add_argument("--truncate-probability", metavar="P", type=float, default=0.4,
                     help="probability of keeping a random 2..N-1 of a group's N references (default: 0.4)")
    aug.add_argument("--drop-text", metavar="P", type=float, default=0.05, help="caption dropped (default: 0.05)")
    aug.add_argument("--drop-references", metavar="P", type=float, default=0.05,
                     help="references replaced by the black unconditional image (default: 0.05)")
    aug.add_argument("--drop-both", metavar="P", type=float, default=0.05, help="both dropped (default: 0.05)")
    aug.add_argument("--face-expand", metavar="F", type=float, default=Augmentations.face_expand,
                     help="each side of the face square moved out by a random whole percentage of it, up to "
                          f"this fraction (default: {Augmentations.face_expand}, the release's 0-49%%)")
    aug.add_argument("--face-flip", metavar="P", type=float, default=0.5,
                     help="face crop flip probability (default: 0.5)")
    aug.add_argument("--crop", choices=CROPS,
                     help="target images: 'center' or 'random' square after resizing the short side to "
                          "--resolution, or 'aspect': the whole image at about resolution² pixels, aspect ratio "
                          "kept, sides multiples of 64 (needs --batch-size 1 for mixed sizes). Default: the "
                          "release's, center for align and single, aspect for multi")
    run = train.add_argument_group("run")
    run.add_argument("--output", required=True, metavar="DIR", help="run folder (new, or this run's to resume)")
    run.add_argument("--max-steps", metavar="N", type=int, default=10_000, help="optimizer steps (default: 10000)")
    run.add_argument("--save-steps", metavar="N", type=int, default=500, help="checkpoint every N steps (default: 500)")
    run.add_argument("--keep-checkpoints", metavar="M", type=int, default=3, help="checkpoints kept (default: 3)")
    run.add_argument("--resume", metavar="latest|CHECKPOINT",
                     help="continue from the newest checkpoint of --output ('latest') or a checkpoint folder")
    run.add_argument("--seed", metavar="N", type=int, default=42,
                     help="seed for weights, data order and noise (default: 42)")
    opt = train.add_argument_group("optimization (defaults: the release's per-stage settings)")
    opt.add_argument("--batch-size", metavar="N", type=int,
                     help="samples per process per micro-batch (default: align 8, single 4, multi 1)")
    opt.add_argument("--gradient-accumulation-steps", metavar="N", type=int,
                     help="micro-batches per step (default: align 1, single 2, multi 4)")
    opt.add_argument("--learning-rate", metavar="LR", type=float,
                     help="AdamW learning rate (default: align 1e-4, single 4e-5, multi 2e-5)")
    opt.add_argument("--lr-scheduler", default="constant", choices=("constant", "constant_with_warmup", "linear",
                                                                    "cosine"), help="(default: constant)")
    opt.add_argument("--lr-warmup-steps", metavar="N", type=int, default=0, help="(default: 0)")
    opt.add_argument("--weight-decay", metavar="W", type=float, default=TrainOptions.weight_decay,
                     help=f"AdamW weight decay (default: {TrainOptions.weight_decay:g})")
    opt.add_argument("--max-grad-norm", metavar="X", type=float, default=TrainOptions.max_grad_norm,
                     help=f"gradient clipping, 0 = off (default: {TrainOptions.max_grad_norm:g}, off)")
    opt.add_argument("--resolution", metavar="PX", type=int, default=1024,
                     help="target image side in pixels (default: 1024)")
    opt.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                     help="(default: the accelerate config's, else no)")
    opt.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute UNet and MLLM activations in backward: less memory, slower")
    opt.add_argument("--noise-offset", metavar="X", type=float, default=0.0, help="noise offset (default: 0)")
    log = train.add_argument_group("logging and validation")
    log.add_argument("--log-steps", metavar="N", type=int, default=10, help="log every N steps (default: 10)")
    log.add_argument("--no-progress", action="store_true", help="no progress bar (log.jsonl is still written)")
    log.add_argument("--validation-steps", metavar="N", type=int, default=0,
                     help="save a grid of validation images every N steps, 0 = never (default: 0)")
    log.add_argument("--validation-records", metavar="N", type=int, default=2,
                     help="the first N records give the validation references and captions (default: 2)")
    log.add_argument("--validation-seeds", metavar="N", type=int, default=2,
                     help="images per record, seeds SEED.. (default: 2)")
    log.add_argument("--validation-inference-steps", metavar="N", type=int, default=30, help="(default: 30)")
    log.add_argument("--validation-guidance-scale", metavar="X", type=float, default=5.0, help="(default: 5.0)")
    # Testing aid, hidden: after step N's checkpoint every process stops and waits to be killed.
    train.add_argument("--pause-after-steps", type=int, help=argparse.SUPPRESS)
    _set_handler(train, run_train)


def options_from_args(args: argparse.Namespace):
    from easyref.training.options import Augmentations, TrainOptions

    augment = Augmentations(resolution=args.resolution, max_references=args.max_references,
                            truncate_probability=args.truncate_probability, drop_text=args.drop_text,
                            drop_references=args.drop_references, drop_both=args.drop_both,
                            face_expand=args.face_expand, face_flip=args.face_flip, crop=args.crop)
    return TrainOptions(
        stage=args.stage, data=Path(args.data), output=Path(args.output), model=args.model, base=args.base,
        mllm=args.mllm, base_config=args.base_config, init=Path(args.init) if args.init else None,
        image_root=Path(args.image_root) if args.image_root else None,
        allow_absolute_paths=args.allow_absolute_paths, skip_earlier_stages=args.skip_earlier_stages,
        max_steps=args.max_steps,
        save_steps=args.save_steps, keep_checkpoints=args.keep_checkpoints, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, resolution=args.resolution, mixed_precision=args.mixed_precision,
        seed=args.seed, gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank,
        noise_offset=args.noise_offset, augment=augment, num_workers=args.num_workers, resume=args.resume,
        log_steps=args.log_steps, validation_steps=args.validation_steps,
        validation_records=args.validation_records, validation_seeds=args.validation_seeds,
        validation_inference_steps=args.validation_inference_steps,
        validation_guidance_scale=args.validation_guidance_scale, num_reference_tokens=args.num_reference_tokens,
        num_final_layers=args.num_final_layers, cond_image_size=args.cond_image_size,
        reference_attention=args.reference_attention, aggregation=args.aggregation,
        negative_prompt=args.negative_prompt, progress=not args.no_progress,
        pause_after_steps=args.pause_after_steps,
    )


def run_train(args: argparse.Namespace) -> int:
    from easyref.training.loop import train

    train(options_from_args(args))
    return 0


# -- data ---------------------------------------------------------------------------------------------

def _add_data(subparsers) -> None:
    data = subparsers.add_parser(
        "data", help="make and check training data in the release's JSON format",
        description="Training data tools: 'groups' writes the release's JSON for a folder of group folders; "
                    "'check' reports missing, unreadable or too-small images and unusable records.",
    )
    add_verbose(data)
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    groups = actions.add_parser(
        "groups", help="turn a folder of group folders into groups.json",
        description="FOLDER holds one folder per group (images showing the same subject or style). Every "
                    "image becomes once the target, the group's other images its references. Captions: a "
                    "sidecar IMAGE.txt (one per line) or the group's captions.json ({\"a.jpg\": \"...\"}). "
                    "Paths are written relative to FOLDER: train with --image-root FOLDER.",
    )
    add_verbose(groups)
    groups.add_argument("folder", metavar="FOLDER")
    groups.add_argument("--output", "-o", required=True, metavar="FILE.json", help="data file to write")
    _set_handler(groups, run_groups)
    check = actions.add_parser(
        "check", help="report problems in a data file before training",
        description="Read every image a data file names, as training would, and count missing, unreadable "
                    "and too-small images, records with an unusable target or no usable reference, and face "
                    "boxes outside their image. Exit status 0 when nothing is wrong, 1 otherwise.",
    )
    add_verbose(check)
    check.add_argument("--data", required=True, metavar="FILE.json")
    check.add_argument("--image-root", metavar="DIR", help="(default: the data file's folder)")
    check.add_argument("--allow-absolute-paths", action="store_true",
                       help="accept absolute image paths (default: refused, as 'easyref train' does)")
    check.add_argument("--min-size", metavar="PX", type=int, default=256,
                       help="images whose shorter side is below this many pixels count as too small (default: 256)")
    check.add_argument("--workers", metavar="N", type=int, default=8, help="images read in parallel (default: 8)")
    check.add_argument("--report", metavar="FILE.json", help="also write every problem to this JSON file")
    _set_handler(check, run_check)


def run_groups(args: argparse.Namespace) -> int:
    from easyref.training.datatools import write_groups

    count, notes = write_groups(args.folder, args.output)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {count} records to {args.output}; check them with: easyref data check --data "
          f"{shlex.quote(str(args.output))} --image-root {shlex.quote(str(args.folder))}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from easyref.files import write_json
    from easyref.training.datatools import check_data

    report = check_data(args.data, args.image_root, args.min_size, args.workers, args.allow_absolute_paths)
    print(f"{args.data}:")
    for line in report.lines():
        print(f"  {line}")
    if args.report:
        write_json(args.report, report.to_dict())
    return 0 if not report.problems else 1
