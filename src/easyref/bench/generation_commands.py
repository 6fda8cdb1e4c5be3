"""The ``bench run`` and ``bench scaling`` commands: what the user types, checked before any model loads.

Both shard over ``accelerate launch`` processes (each group exactly once, one GPU per process)
and resume an interrupted run folder. Heavy libraries are imported inside the handlers so
``--help`` answers at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from easyref import ip_adapter_format
from easyref.cli_options import SAMPLING_FLAGS, add_device_options, add_model_options, add_verbose
from easyref.config import AGGREGATIONS
from easyref.errors import InvalidArgumentError, OutputPathError

METHOD_NAMES = ("easyref", "ip-adapter", "lora", "text-only")
DEFAULT_SIZES = (1, 2, 4, 8, 16, 32)
SHARDING = ("Shard over several GPUs with: accelerate launch --num_processes 8 -m easyref bench {command} ... "
            "(each group is generated exactly once; on a CPU-only machine use accelerate launch --multi_gpu "
            "--num_processes N with --device cpu).")


def _add_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``scaling``: benchmark, method, models, sampling, tuning, hardware."""
    add_verbose(parser)
    parser.add_argument("--bench", metavar="MANIFEST.jsonl", required=True,
                        help="benchmark manifest (JSON lines, one group per line; paths relative to the file)")
    parser.add_argument("--method", choices=METHOD_NAMES, default="easyref",
                        help="what generates the images: easyref, the ip-adapter baseline (per-image CLIP "
                             "embeddings averaged), lora (a LoRA tuned on each group) or text-only (the caption "
                             "alone) (default: easyref)")
    parser.add_argument("--output", "-o", metavar="DIR", required=True,
                        help="run folder to write (created if missing); an existing one for the same benchmark, "
                             "method and settings is resumed, finished groups kept")
    parser.add_argument("--images-per-group", type=int, default=1, metavar="N",
                        help="images generated per group in one seeded call, 1 to 16 (default: 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="base seed; each group's seed is derived from it and the group id, so it does not "
                             "depend on order, --limit or sharding (default: 0)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="only the first N groups by id, for a quick trial (default: all)")

    models = add_model_options(parser)
    models.add_argument("--ip-adapter", metavar="SOURCE",
                        help="ip-adapter method: a folder or hub id holding the IP-Adapter weights (e.g. "
                             "h94/IP-Adapter with --ip-adapter-subfolder sdxl_models), or the weight file itself")
    models.add_argument("--ip-adapter-subfolder", default="", metavar="SUB",
                        help="sub-folder of --ip-adapter holding the weights and image_encoder/ (default: none)")
    models.add_argument("--ip-adapter-weight-name", default=ip_adapter_format.WEIGHT_NAME, metavar="FILE",
                        help="IP-Adapter weight file name (default: ip-adapter_sdxl.safetensors)")
    models.add_argument("--image-encoder", metavar="DIR_OR_ID",
                        help="CLIP image encoder (CLIPVisionModelWithProjection) for the ip-adapter method "
                             "(default: image_encoder/ beside the IP-Adapter weights)")

    sampling = parser.add_argument_group("sampling (the same for every method)")
    sampling.add_argument("--steps", type=int, default=30, metavar="N", help="denoising steps, 1 to 1000 (default: 30)")
    sampling.add_argument("--guidance-scale", type=float, default=5.0, metavar="X",
                          help="classifier-free guidance strength; <= 1 switches it off (default: 5.0)")
    sampling.add_argument("--scale", type=float, default=1.0, metavar="X",
                          help="reference strength for easyref and ip-adapter; 0 gives the base model's image "
                               "(default: 1.0)")
    sampling.add_argument("--height", type=int, metavar="PX",
                          help="image height, a multiple of 8 from 64 to 4096 (default: the model's, 1024 for SDXL)")
    sampling.add_argument("--width", type=int, metavar="PX",
                          help="image width, a multiple of 8 from 64 to 4096 (default: the model's, 1024 for SDXL)")
    sampling.add_argument("--aggregation", choices=AGGREGATIONS,
                          help="easyref only: how a group becomes tokens, overriding the adapter's config (paper "
                               "Table 5): tokens (EasyRef), average (each reference alone, averaged) or concat "
                               "(all image tokens) (default: the adapter's)")

    lora = parser.add_argument_group("lora tuning (per group, before sampling)")
    lora.add_argument("--lora-steps", type=int, default=500, metavar="N",
                      help="training steps per group, one reference per step (default: 500)")
    lora.add_argument("--lora-rank", type=int, default=4, metavar="R", help="LoRA rank (default: 4)")
    lora.add_argument("--lora-lr", type=float, default=1e-4, metavar="LR", help="AdamW learning rate (default: 1e-4)")
    lora.add_argument("--lora-resolution", type=int, default=1024, metavar="PX",
                      help="training resolution: references are resized and centre-cropped to PXxPX "
                           "(default: 1024)")

    add_device_options(parser)


def add_run_commands(subparsers: Any) -> None:
    """Add ``run`` and ``scaling`` to the ``bench`` sub-command parsers (``handler(args) -> int``)."""
    run = subparsers.add_parser(
        "run", help="generate a method's images for every benchmark group into a run folder",
        description="Generate images for every group of a benchmark with one method. Writes RUN/run.json and "
                    "RUN/images/<group>/<k>.png with a JSON sidecar each (method, settings, seed, seconds per "
                    "image, tuning seconds for lora). Interrupted runs resume; finished groups are never redone.",
        epilog=SHARDING.format(command="run"))
    _add_options(run)
    run.set_defaults(handler=cmd_run)

    scaling = subparsers.add_parser(
        "scaling", help="cost and quality as the reference group grows (paper Fig. 9)",
        description="For each size N, generate every group with at least N references from its first N into "
                    "DIR/size-N/ (an ordinary run folder for 'bench score'), and write DIR/scaling.csv with the "
                    "number of groups generated and skipped and the median seconds per image per size.",
        epilog=SHARDING.format(command="scaling"))
    _add_options(scaling)
    scaling.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), metavar="N",
                         help="numbers of references to try (default: 1 2 4 8 16 32)")
    scaling.set_defaults(handler=cmd_scaling)


def _check_args(args: argparse.Namespace, run_folders: list[Path]) -> None:
    """Everything checkable without a model: numbers, the manifest and its files, the run folders."""
    from easyref.bench import runs
    from easyref.bench.manifest import check_references, load_manifest
    from easyref.bench.methods import LoRATuning
    from easyref.devices import pick_device, pick_dtype
    from easyref.pipeline import MAX_IMAGES_PER_CALL, check_generation_args

    if not 1 <= args.images_per_group <= MAX_IMAGES_PER_CALL:
        raise InvalidArgumentError(f"--images-per-group must be between 1 and {MAX_IMAGES_PER_CALL}, "
                                   f"got {args.images_per_group}")
    check_generation_args(height=args.height, width=args.width, scale=args.scale, guidance_scale=args.guidance_scale,
                          num_inference_steps=args.steps, num_images=1, seed=args.seed, names=SAMPLING_FLAGS)
    if args.method == "lora":
        LoRATuning(args.lora_steps, args.lora_rank, args.lora_lr, args.lora_resolution).check()
    if args.limit is not None and args.limit < 1:
        raise InvalidArgumentError(f"--limit must be a positive number of groups, got {args.limit}")
    pick_dtype(args.dtype, pick_device(args.device))
    groups = sorted(load_manifest(args.bench), key=lambda group: group.id)[:args.limit]
    check_references(groups)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise OutputPathError(f"--output {output} is a file; give a run folder")
    for folder in run_folders:
        if (folder / runs.RUN_INFO).is_file():
            runs.open_run(folder, args.bench, args.method, {})  # only checks benchmark and method; writes nothing


def _launch(args: argparse.Namespace) -> tuple[Any, Any]:
    """The accelerate state of this launch and the device this process generates on.

    ``--device auto`` takes the process's own accelerator (cuda:<local rank> under ``accelerate
    launch``); on a machine without CUDA the processes talk over CPU (gloo).
    """
    import torch
    from accelerate import PartialState

    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    return state, (state.device if args.device == "auto" else args.device)


def cmd_run(args: argparse.Namespace) -> int:
    from easyref.bench.methods import make_method
    from easyref.bench.runner import run_benchmark

    _check_args(args, [Path(args.output)])
    state, device = _launch(args)
    method = make_method(args.method, args, device)
    run = run_benchmark(args.bench, method, args.output, images_per_group=args.images_per_group, seed=args.seed,
                        limit=args.limit, accelerator=state)
    if state.is_main_process:
        from easyref.bench.runs import read_images

        images = read_images(run)
        print(f"{run}: {len(images)} images of {len({image.group_id for image in images})} groups "
              f"(images/<group>/<k>.png, each with a .json sidecar). Score them with:\n"
              f"  easyref bench score {run} --clip CLIP --dino DINO")
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from easyref.bench.methods import make_method
    from easyref.bench.scaling import run_scaling, size_folder

    if any(size < 1 for size in args.sizes):
        raise InvalidArgumentError(f"--sizes must be positive numbers of references, got {args.sizes}")
    _check_args(args, [size_folder(args.output, size) for size in args.sizes])
    state, device = _launch(args)
    method = make_method(args.method, args, device)
    path = run_scaling(args.bench, method, args.output, args.sizes, images_per_group=args.images_per_group,
                       seed=args.seed, limit=args.limit, accelerator=state)
    if state.is_main_process:
        print(path)
    return 0
