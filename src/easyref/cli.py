"""The ``easyref`` command line: generate, encode, make-tiny, convert.

Every command checks what the user typed (numbers, output paths, reference images, embeds
files) before any model is loaded, so a typo costs a second, not a minute of loading. Problems
the user can fix arrive as one ``error: ...`` line on stderr and a non-zero exit status (2 for
a wrong command line, 1 for a bad file or value, 130 for Ctrl-C); ``-v`` adds the traceback.

Heavy libraries (torch, diffusers, transformers) are imported inside the command functions, so
``easyref --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import io
import json
import math
import os
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from easyref.cli_options import SAMPLING_FLAGS, add_device_options, add_model_options, add_verbose
from easyref.errors import EasyRefError, InvalidArgumentError, ModelFormatError, OutputPathError
from easyref.files import atomic_folder, atomic_path, check_output_path, sha256_file
from easyref.quiet import quiet_libraries

PROG = "easyref"
EMBEDS_KEY = "embeds"
NEGATIVE_EMBEDS_KEY = "negative_embeds"
EMBEDS_SUFFIX = ".safetensors"


class UsageError(Exception):
    """The command line itself is wrong (unknown option, missing argument, conflicting options)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises instead of printing usage and exiting, so ``main`` owns the output."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _version() -> str:
    from easyref import __version__

    return __version__


# -- the parser ---------------------------------------------------------------------------------

def _add_reference_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("references")
    group.add_argument(
        "--ref", metavar="IMG", action="append", required=required,
        help="a reference image, or a folder (every .png/.jpg/.jpeg/.webp/.bmp/.gif/.tif image directly "
             "inside it, sorted by name). Repeat for a group: --ref a.png --ref b.png. 1 to 128 images "
             "in all (the adapter's max_references)",
    )
    group.add_argument(
        "--negative-ref", metavar="IMG", action="append",
        help="a negative reference image or folder (repeatable): this group is encoded for the "
             "unconditional guidance branch instead of the default black image (default: none)",
    )


def build_parser() -> argparse.ArgumentParser:
    from easyref.config import RELEASE_NEGATIVE_PROMPT

    parser = _Parser(
        prog=PROG,
        description="EasyRef: generate SDXL images that follow a group of reference images and a prompt.",
        epilog="Start offline with: easyref make-tiny tiny-model  (then follow the printed command). "
               "Run 'easyref COMMAND --help' for each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    add_verbose(parser, default=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # generate ---------------------------------------------------------------------------------
    gen = commands.add_parser(
        "generate", help="generate images from reference images (or saved embeds) and a prompt",
        description="Generate images that follow a group of reference images and a prompt. Writes the "
                    "image(s) and a JSON sidecar OUT.json with every setting, the seed, file hashes and "
                    "library versions needed to reproduce them.",
        epilog="example: easyref generate --model tiny-model --ref refs/ --prompt 'a cat' "
               "--steps 4 --height 64 --width 64 --output cat.png",
    )
    add_verbose(gen, default=argparse.SUPPRESS)
    add_model_options(gen)
    _add_reference_options(gen, required=False)
    gen.add_argument("--example", metavar="NAME",
                     help="instead of --ref, an example group of the bundled ShapesWorld model (use with "
                          "--model shapesworld): its 4 references, and its caption as the prompt unless --prompt "
                          "is given. Names: held-in-identity, held-in-style, held-out-identity, held-out-style, "
                          "held-out-scene; 'easyref shapes examples DIR' writes them as files (default: none)")
    gen.add_argument("--embeds", metavar="FILE",
                     help="use reference embeds saved by 'easyref encode' instead of --ref; the MLLM is "
                          "then not loaded (default: none)")
    gen.add_argument("--other-model-embeds", action="store_true",
                     help="accept --embeds computed with another adapter (its config differs from this "
                          "model's); they usually make a wrong image, so this is refused by default")
    gen.add_argument("--prompt", metavar="TEXT",
                     help="text prompt; required with --ref. With --embeds the prompt stored in the file "
                          "is used unless this is given")
    gen.add_argument("--negative-prompt", metavar="TEXT",
                     help=f"what the image should not show (default: the model's, for the release "
                          f"'{RELEASE_NEGATIVE_PROMPT}'; with --embeds, the file's if it stored one). An empty "
                          "string means no negative text")
    gen.add_argument("--output", "-o", metavar="OUT.png", required=True,
                     help="image file to write; its suffix picks the format (.png, .jpg, .webp, ...). "
                          "With --num-images N>1 the files are OUT_0.png ... OUT_{N-1}.png. The sidecar "
                          "OUT.json is written beside it. The folder must exist")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--seed", type=int, default=0, metavar="N",
                          help="random seed; the same seed and settings give the same pixels (default: 0)")
    sampling.add_argument("--steps", type=int, default=30, metavar="N",
                          help="number of denoising steps, 1 to 1000 (default: 30)")
    sampling.add_argument("--scale", type=float, default=1.0, metavar="X",
                          help="weight of the reference tokens: 0 switches them off (the base model's own image "
                               "unless the adapter carries a UNet LoRA, as stage single/multi adapters do), 1 the "
                               "trained strength; a finite number >= 0 (default: 1.0)")
    sampling.add_argument("--guidance-scale", type=float, default=5.0, metavar="X",
                          help="classifier-free guidance strength; values <= 1 switch guidance off "
                               "(default: 5.0)")
    sampling.add_argument("--height", type=int, metavar="PX",
                          help="image height in pixels, a multiple of 8 from 64 to 4096 "
                               "(default: the model's native size, 1024 for SDXL)")
    sampling.add_argument("--width", type=int, metavar="PX",
                          help="image width in pixels, a multiple of 8 from 64 to 4096 "
                               "(default: the model's native size, 1024 for SDXL)")
    sampling.add_argument("--num-images", type=int, default=1, metavar="N",
                          help="images to generate in one call, 1 to 16 (default: 1)")
    control = gen.add_argument_group("reference control")
    control.add_argument("--ref-start", type=float, default=0.0, metavar="F",
                         help="the references act from this fraction of the denoising steps on (default: 0.0)")
    control.add_argument("--ref-end", type=float, default=1.0, metavar="F",
                         help="... up to this fraction: 0.5 lets them set the layout and leaves the details to the "
                              "prompt (default: 1.0)")
    control.add_argument("--ref-layers", metavar="PRESET|JSON", default="all",
                         help="which layers read the references: all, style (InstantStyle's style block of SDXL), "
                              "composition (its layout block), style+composition, or diffusers' per-block JSON, "
                              "e.g. '{\"up\": {\"block_0\": [0, 1, 0]}}', each value times --scale (default: all)")
    control.add_argument("--ref-mask", metavar="IMG",
                         help="an image, white where the references act and black where they do not; stretched "
                              "to the output size (default: everywhere)")
    control.add_argument("--group", nargs="+", action="append", metavar="KEY=VALUE",
                         help="one more reference group, read by the MLLM on its own and added through the same "
                              "adapter: ref=IMG|DIR (repeat for several), and optionally prompt=TEXT (what the MLLM "
                              "reads with it; default --prompt), scale=X, mask=IMG, start=F, end=F, layers=PRESET|JSON "
                              "(as the options above). Repeat --group for more groups, e.g. --ref face/ --group "
                              "ref=style/ scale=0.6 layers=style")
    gen.add_argument("--lora", metavar="FILE[:WEIGHT]", action="append",
                     help="an SDXL LoRA (.safetensors, kohya or diffusers format) to apply at WEIGHT (default 1) "
                          "alongside EasyRef's own; repeat for several, e.g. --lora pixel.safetensors:0.8")
    add_device_options(gen)
    gen.set_defaults(func=cmd_generate)

    # encode -----------------------------------------------------------------------------------
    enc = commands.add_parser(
        "encode", help="encode a reference group once into an embeds file for 'generate --embeds'",
        description="Run the MLLM once over a reference group and save the conditioning tokens "
                    "('embeds', shape 1 x tokens x dim) and the unconditional ones ('negative_embeds') "
                    "to a safetensors file. 'easyref generate --embeds FILE' then needs no MLLM.",
        epilog="example: easyref encode --model tiny-model --ref refs/ --prompt 'a cat' --output cat.safetensors",
    )
    add_verbose(enc, default=argparse.SUPPRESS)
    add_model_options(enc)
    _add_reference_options(enc, required=True)
    enc.add_argument("--prompt", metavar="TEXT", required=True,
                     help="text prompt encoded with the references; stored in the file and used by "
                          "'generate --embeds' unless it gets its own --prompt")
    enc.add_argument("--negative-prompt", metavar="TEXT",
                     help="prompt encoded with --negative-ref; stored in the file as the default negative "
                          "prompt of 'generate --embeds' (default: none stored: the model's default applies)")
    enc.add_argument("--output", "-o", metavar="FILE.safetensors", required=True,
                     help="embeds file to write (must end in .safetensors; the folder must exist)")
    add_device_options(enc)
    enc.set_defaults(func=cmd_encode)

    # make-tiny --------------------------------------------------------------------------------
    tiny = commands.add_parser(
        "make-tiny", help="write a tiny random model folder for offline tests and trying the commands",
        description="Write a complete, tiny, randomly initialised model folder (base/, mllm/, adapter/; "
                    "about 12 MB) that loads like a real one and generates 64x64 images in a second on a "
                    "CPU. Its images are noise: it is for checking an install and for tests.",
    )
    add_verbose(tiny, default=argparse.SUPPRESS)
    tiny.add_argument("folder", metavar="DIR",
                      help="folder to create; it must not exist or be empty, and its parent must exist")
    tiny.add_argument("--seed", type=int, default=0, metavar="N",
                      help="seed for the random weights; the same seed writes the same weights (default: 0)")
    tiny.set_defaults(func=cmd_make_tiny)

    # convert ----------------------------------------------------------------------------------
    conv = commands.add_parser(
        "convert", help="convert an official EasyRef release checkpoint into an adapter folder",
        description="Convert a checkpoint of the official EasyRef release into an adapter folder "
                    "(config.json + model.safetensors, plus mllm.safetensors when the release finetuned "
                    "the MLLM) that loads with --adapter or as MODEL/adapter.",
    )
    add_verbose(conv, default=argparse.SUPPRESS)
    conv.add_argument("--official", metavar="CKPT", required=True,
                      help="the official release checkpoint file")
    add_model_options(conv, adapter=False)
    conv.add_argument("--output", "-o", metavar="ADAPTER_DIR", required=True,
                      help="adapter folder to write; it must not exist or be empty unless --overwrite")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty ADAPTER_DIR (swapped in only once the new one is complete; "
                           "default: refuse)")
    conv.set_defaults(func=cmd_convert)

    # demo -------------------------------------------------------------------------------------
    demo = commands.add_parser(
        "demo", help="a web page: drop a group of references, type a prompt, get images",
        description="Serve a Gradio web app: upload a reference group (and optional negative references), "
                    "type a prompt, set scale, steps, guidance, seed and size, and download each image with "
                    "its JSON sidecar. Without a model option it serves the bundled ShapesWorld model, "
                    "offline, with clickable example groups. Needs the 'demo' extra: "
                    "pip install 'easyref[demo]'.",
        epilog="example: easyref demo  (then open http://127.0.0.1:7860)",
    )
    add_verbose(demo, default=argparse.SUPPRESS)
    add_model_options(demo)
    demo.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                      help="address to listen on; 0.0.0.0 makes the page reachable from other machines "
                           "(default: 127.0.0.1, this machine only)")
    demo.add_argument("--port", type=int, default=7860, metavar="N", help="port to listen on (default: 7860)")
    demo.add_argument("--share", action="store_true",
                      help="also open a public gradio.live link (needs internet; default: off)")
    demo.add_argument("--output-dir", metavar="DIR",
                      help="keep every generation here, one numbered folder each (default: a temporary folder)")
    add_device_options(demo)
    demo.set_defaults(func=cmd_demo)
    # Training and benchmarking register their own commands (they import the model parts, never the CLI).
    from easyref.bench.commands import add_commands as add_bench_commands
    from easyref.shapes.commands import add_commands as add_shapes_commands
    from easyref.training.commands import add_commands as add_training_commands

    add_training_commands(commands)
    add_bench_commands(commands)
    add_shapes_commands(commands)
    return parser


# -- shared helpers -----------------------------------------------------------------------------

def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _command_line(argv: Sequence[str]) -> str:
    return shlex.join([PROG, *argv])


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if not any(getattr(args, part, None) for part in ("model", "base", "mllm", "adapter")):
        raise UsageError(f"give --model DIR (or --base, --mllm and --adapter) (see '{PROG} {args.command} --help')")
    return {"base": args.base, "mllm": args.mllm, "adapter": getattr(args, "adapter", None),
            "base_config": getattr(args, "base_config", None)}


def _check_hardware(args: argparse.Namespace) -> None:
    from easyref.devices import pick_device, pick_dtype

    pick_dtype(getattr(args, "mllm_dtype", None), pick_device(args.device))
    pick_dtype(args.dtype, pick_device(args.device))
    if getattr(args, "mllm_quantize", None) and importlib.util.find_spec("torchao") is None:
        raise UsageError("--mllm-quantize needs torchao: pip install 'easyref[quantize]'")
    if getattr(args, "offload", None) and pick_device(args.device).type == "cpu":
        raise UsageError(f"--offload {args.offload} lends a GPU one part at a time, but this runs on the CPU "
                         "(--device); it is for a GPU with too little memory for every part at once")


def _load_group(sources: Sequence[str]) -> tuple[list, list[dict[str, str]]]:
    """Expand folders, decode every image (validating it) and hash each file, before any model loads."""
    from easyref.config import MAX_REFERENCES
    from easyref.images import expand_references, load_references

    paths = [str(path) for path in expand_references(list(sources))]
    images = load_references(paths, MAX_REFERENCES)
    return images, [{"path": path, "sha256": sha256_file(path)} for path in paths]


_GROUP_KEYS = ("ref", "prompt", "scale", "mask", "start", "end", "layers")


def _check_mask(path: str, option: str) -> None:
    """Read the mask now, before the model loads (a wrong or all-black mask fails in a second, not a minute)."""
    from easyref.controls import load_mask

    try:
        load_mask(path, 512, 512)
    except EasyRefError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _group_option(spec: Sequence[str], steps: int) -> tuple[Any, dict[str, Any]]:
    """One ``--group KEY=VALUE ...`` as a :class:`ReferenceGroup` (its images loaded and checked) and its record."""
    from easyref.controls import ReferenceGroup, active_steps, parse_layers
    from easyref.pipeline import check_prompt, check_scale

    values: dict[str, list[str]] = {}
    for item in spec:
        key, sep, value = item.partition("=")
        if not sep or key not in _GROUP_KEYS:
            raise UsageError(f"--group takes KEY=VALUE items with KEY one of {', '.join(_GROUP_KEYS)}; got {item!r}")
        if key != "ref" and key in values:
            raise UsageError(f"--group: {key}= given twice in one group")
        values.setdefault(key, []).append(value)
    if "ref" not in values:
        raise UsageError("--group needs at least one ref=IMG|DIR")
    one = {key: items[0] for key, items in values.items()}
    numbers = {}
    for key, default in (("scale", 1.0), ("start", 0.0), ("end", 1.0)):
        try:
            numbers[key] = float(one.get(key, default))
        except ValueError:
            raise UsageError(f"--group: {key}= must be a number, got {one[key]!r}") from None
    try:
        check_scale(numbers["scale"], "--group scale=")
    except InvalidArgumentError as exc:
        raise UsageError(str(exc)) from None
    active_steps(steps, numbers["start"], numbers["end"])
    if "prompt" in one:
        check_prompt(one["prompt"], "--group prompt=")
    if "mask" in one:
        _check_mask(one["mask"], "--group mask=")
    layers = parse_layers(one["layers"]) if "layers" in one else None
    images, references = _load_group(values["ref"])
    group = ReferenceGroup(images, prompt=one.get("prompt"), mask=one.get("mask"), layers=layers, **numbers)
    mask = {"path": one["mask"], "sha256": sha256_file(one["mask"])} if "mask" in one else None
    return group, {"references": references, "mask": mask}


def _lora_option(text: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` as (path, weight); a colon that is not followed by a number belongs to the path."""
    path, sep, weight = text.rpartition(":")
    try:
        path, value = (path, float(weight)) if sep else (text, 1.0)
    except ValueError:
        path, value = text, 1.0
    if not math.isfinite(value):
        raise UsageError(f"--lora {text}: the weight must be a finite number")
    if not Path(path).is_file():
        raise UsageError(f"--lora {text}: no such file {path}")
    return path, value


def _image_format(path: Path) -> str:
    """PIL's save format for ``path``'s suffix, or an error naming the suffixes that work."""
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise OutputPathError(
            f"output {path}: cannot tell the image format from "
            f"{f'the suffix {path.suffix!r}' if path.suffix else 'a name without a suffix'}; "
            "use .png, .jpg, .webp, ..."
        )
    # Some formats PIL knows cannot hold an RGB image here (XBM is 1-bit; HDF5, GRIB, BUFR need plugins):
    # find out with one pixel now, not after the models have loaded and the image is made.
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception as exc:  # noqa: BLE001 - any failure means the same: this suffix cannot be written
        raise OutputPathError(f"output {path}: PIL cannot write an RGB image as {fmt} ({exc}); use .png, .jpg, "
                              ".webp, ...") from None
    return fmt


def _image_outputs(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{index}{path.suffix}") for index in range(count)]


def _save_image(image, path: Path, fmt: str) -> None:
    image.save(path, format=fmt)


def _load_pipeline(args: argparse.Namespace, load_mllm: bool = True, load_base: bool = True):
    from easyref.pipeline import EasyRefPipeline

    _say("loading model...")
    return EasyRefPipeline.from_pretrained(args.model, **_model_kwargs(args), device=args.device,
                                           torch_dtype=args.dtype, mllm_dtype=getattr(args, "mllm_dtype", None),
                                           load_mllm=load_mllm, load_base=load_base,
                                           mllm_quantize=getattr(args, "mllm_quantize", None),
                                           offload=getattr(args, "offload", None))


def read_embeds(path: str | Path) -> tuple[Any, Any, dict[str, str]]:
    """``(embeds, negative_embeds, metadata)`` from a file written by ``easyref encode``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"embeds file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            missing = [key for key in (EMBEDS_KEY, NEGATIVE_EMBEDS_KEY) if key not in keys]
            if missing:
                raise ModelFormatError(
                    f"embeds file {path} has no {' or '.join(repr(k) for k in missing)} tensor; "
                    "write it with 'easyref encode'"
                )
            embeds = handle.get_tensor(EMBEDS_KEY)
            negative = handle.get_tensor(NEGATIVE_EMBEDS_KEY)
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, EasyRefError):
            raise
        raise ModelFormatError(f"embeds file {path} is not a safetensors file ({exc})") from None
    return embeds, negative, metadata


def _check_prompts(args: argparse.Namespace) -> None:
    """--prompt and --negative-prompt within the pipeline's limits, before any model loads."""
    from easyref.pipeline import check_prompt

    for text, flag in ((args.prompt, "--prompt"), (args.negative_prompt, "--negative-prompt")):
        if text is not None:
            check_prompt(text, flag)


def _check_sidecar_is_ours(sidecar: Path) -> None:
    """The image's sidecar may replace an earlier easyref sidecar, never a user's own JSON file."""
    if not sidecar.exists():
        return
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not (isinstance(data, dict) and str(data.get("command", "")).startswith(f"{PROG} ") and "versions" in data):
        raise OutputPathError(f"{sidecar} exists and was not written by {PROG}: the image's settings file would "
                              "replace it; choose another --output name")


def _check_embeds_source(path: str, metadata: dict[str, str], config: dict[str, Any]) -> None:
    """Refuse embeds whose recorded adapter config differs from the loaded one (another model made them)."""
    recorded = _maybe_json(metadata.get("adapter_config", ""))
    if not isinstance(recorded, dict):
        return
    different = sorted(key for key in recorded.keys() & config.keys() if recorded[key] != config[key])
    if different:
        raise ModelFormatError(f"embeds file {path} was computed with another adapter ({', '.join(different)} "
                               "differ from this model's); encode the references with this model, or pass "
                               "--other-model-embeds to use them anyway")


def _maybe_json(text: str) -> Any:
    """Metadata values that ``encode`` stored as JSON come back as objects (for the sidecar)."""
    if text[:1] in ("[", "{"):
        with contextlib.suppress(ValueError):
            return json.loads(text)
    return text


# -- commands -----------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from easyref.pipeline import check_generation_args

    if sum(map(bool, (args.embeds, args.ref, args.example))) > 1:
        raise UsageError("give one of --ref, --example or --embeds")
    if args.example:
        from easyref.shapes.examples import example_group, example_images

        example = example_group(args.example)
        args.prompt = example.caption if args.prompt is None else args.prompt
    if not args.embeds and not args.ref and not args.example:
        raise UsageError(f"give reference images with --ref (or an example group with --example, or an embeds "
                         f"file with --embeds) "
                         f"(see '{PROG} generate --help')")
    if args.embeds and args.negative_ref:
        raise UsageError("--negative-ref needs the MLLM; with --embeds, give the negative references to "
                         "'easyref encode --negative-ref' instead")
    if not args.embeds and args.prompt is None:
        raise UsageError(f"give --prompt TEXT (it may be empty: --prompt '') (see '{PROG} generate --help')")
    _model_kwargs(args)

    # Everything the user typed is checked here, before the (slow) model load.
    check_generation_args(height=args.height, width=args.width, scale=args.scale,
                          guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
                          num_images=args.num_images, seed=args.seed, names=SAMPLING_FLAGS)
    _check_prompts(args)
    from easyref.controls import ReferenceGroup, active_steps, parse_layers

    active_steps(args.steps, args.ref_start, args.ref_end)
    layers = parse_layers(args.ref_layers)
    if args.group and args.embeds:
        raise UsageError("--group needs the MLLM to read its references; it does not combine with --embeds")
    extra_groups = [_group_option(spec, args.steps) for spec in args.group or []]
    if args.ref_mask:
        _check_mask(args.ref_mask, "--ref-mask")
    loras = [_lora_option(text) for text in args.lora or []]
    outputs = _image_outputs(args.output, args.num_images)
    fmt = _image_format(outputs[0])
    sidecar = Path(args.output).with_suffix(".json")
    for path in [*outputs, sidecar]:
        check_output_path(path)
    _check_sidecar_is_ours(sidecar)
    _check_hardware(args)

    record: dict[str, Any] = {}
    images = negative_images = embeds = negative_embeds = None
    prompt, negative_prompt = args.prompt, args.negative_prompt
    if args.embeds:
        embeds, negative_embeds, metadata = read_embeds(args.embeds)
        prompt = metadata.get("prompt", "") if prompt is None else prompt
        if negative_prompt is None:
            negative_prompt = metadata.get("negative_prompt")
        record["embeds"] = {"path": args.embeds, "sha256": sha256_file(args.embeds),
                            "metadata": {key: _maybe_json(value) for key, value in metadata.items()}}
    else:
        if args.example:
            images = example_images(example)
            record["example"] = {"name": args.example, "group": example.id, "caption": example.caption}
        else:
            images, record["references"] = _load_group(args.ref)
        if args.negative_ref:
            negative_images, record["negative_references"] = _load_group(args.negative_ref)

    pipe = _load_pipeline(args, load_mllm=not args.embeds)
    if args.embeds and not args.other_model_embeds:
        _check_embeds_source(args.embeds, metadata, pipe.config.to_dict())
    for path, weight in loras:
        pipe.load_lora(path, weight)
    if loras:
        record["loras"] = [{"path": path, "sha256": sha256_file(path), "weight": weight} for path, weight in loras]
    first = ReferenceGroup(images, embeds, scale=args.scale, mask=args.ref_mask, start=args.ref_start,
                           end=args.ref_end, layers=layers)
    if args.ref_mask:
        record["ref_mask"] = {"path": args.ref_mask, "sha256": sha256_file(args.ref_mask)}
    if extra_groups:
        record["groups"] = [record_ for _, record_ in extra_groups]
    result = pipe(None, prompt, groups=[first, *(group for group, _ in extra_groups)],
                  negative_embeds=negative_embeds, negative_references=negative_images,
                  negative_prompt=negative_prompt, seed=args.seed, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                  num_images=args.num_images, progress=True)

    sidecar_data = {**pipe.sidecar(result, [path.name for path in outputs]), **record,
                    "command": _command_line(argv)}
    _write_outputs(result.images, outputs, fmt, sidecar, sidecar_data)
    for path in outputs:
        print(path)
    return 0


def _write_outputs(images: list, outputs: list[Path], fmt: str, sidecar: Path, data: dict) -> None:
    """Write every image and the sidecar to temporary files; rename them all only if all succeeded."""

    with contextlib.ExitStack() as stack:
        for image, path in zip(images, outputs, strict=True):
            _save_image(image, stack.enter_context(atomic_path(path)), fmt)
        tmp = stack.enter_context(atomic_path(sidecar))
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def cmd_encode(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from easyref.weights import save_safetensors

    _model_kwargs(args)
    _check_prompts(args)
    output = check_output_path(args.output)
    if output.suffix != EMBEDS_SUFFIX:
        raise OutputPathError(f"embeds file {output} must end in {EMBEDS_SUFFIX}")
    _check_hardware(args)
    images, references = _load_group(args.ref)
    negative_images, negative_references = _load_group(args.negative_ref) if args.negative_ref else (None, [])

    pipe = _load_pipeline(args, load_base=False)
    embeds = pipe.encode_references(images, args.prompt)
    if negative_images is not None:
        negative_prompt = pipe.config.negative_prompt if args.negative_prompt is None else args.negative_prompt
        negative = pipe.encode_references(negative_images, negative_prompt)
    else:
        negative = pipe.unconditional_embeds()
    metadata = {
        "format": "pt",
        "prompt": args.prompt,
        "references": json.dumps(references),
        "negative_references": json.dumps(negative_references),
        "adapter_config": json.dumps(pipe.config.to_dict(), sort_keys=True),
        "sources": json.dumps(pipe.sources, sort_keys=True),
        "easyref_version": _version(),
        "command": _command_line(argv),
    }
    if args.negative_prompt is not None:  # absent: 'generate --embeds' takes the model's default
        metadata["negative_prompt"] = args.negative_prompt
    save_safetensors(output, {EMBEDS_KEY: embeds, NEGATIVE_EMBEDS_KEY: negative}, metadata)
    print(output)
    return 0


def _check_new_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{folder} is a file; give a new folder name")
    if folder.is_dir() and any(folder.iterdir()):
        raise OutputPathError(f"folder {folder} is not empty; give a new or empty folder")
    parent = folder.parent
    if not parent.is_dir():
        raise OutputPathError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"output folder {parent} is not writable")


def cmd_make_tiny(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from easyref.tiny import make_tiny

    folder = Path(args.folder)
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    try:  # like the other output commands, make the missing parent folders
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create output folder {folder.parent} ({exc.strerror})") from None
    _check_new_folder(folder)
    _say(f"writing a tiny random model to {folder} ...")
    # Built beside the target and renamed at the end: an interrupted run leaves no half model.
    with atomic_folder(folder) as staging:
        make_tiny(staging, seed=args.seed)
    quoted = shlex.quote(str(folder))
    print(f"wrote {folder}/ (base/, mllm/, adapter/). Try:\n"
          f"  {PROG} generate --model {quoted} --ref YOUR_IMAGE_OR_FOLDER --prompt 'a photo' "
          f"--steps 4 --height 64 --width 64 --output tiny.png")
    return 0


def cmd_convert(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from easyref.official import import_official

    _model_kwargs(args)
    _say("loading model and converting...")
    # import_official checks the output folder first, then the checkpoint, then loads the models,
    # and writes the adapter folder complete or not at all.
    folder = import_official(args.official, args.output, model=args.model, base=args.base, mllm=args.mllm,
                             overwrite=args.overwrite, base_config=args.base_config)
    print(folder)
    return 0


# -- entry point --------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise UsageError("the web app needs Gradio: pip install 'easyref[demo]'")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    if not any((args.model, args.base, args.mllm, args.adapter)):
        args.model = "shapesworld"
    _check_hardware(args)
    pipe = _load_pipeline(args)
    from easyref.hub import bundled_folder
    from easyref.web import DemoBackend, example_groups, launch

    label = Path(args.model).name if args.model else Path(args.adapter or args.base).name
    backend = DemoBackend(pipe, args.output_dir, model_label=label)
    if Path(pipe.sources["adapter"]).parent == bundled_folder("shapesworld"):
        backend.examples = example_groups(backend.output_dir / "examples")
    _say(f"serving on http://{args.host}:{args.port} (Ctrl+C stops)")
    try:
        launch(backend, args.host, args.port, share=args.share)
    except OSError as exc:
        raise OutputPathError(f"cannot listen on {args.host}:{args.port} ({exc}); pick another --port") from None
    return 0


def _one_line(message: object) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " ".join(lines) or "(no message)"


def _error(message: object) -> None:
    line = f"error: {_one_line(message)}"
    print(line, file=sys.stderr, flush=True)
    _tell_the_launcher(line)


def _tell_the_launcher(line: str) -> None:
    """Under torch's elastic launcher (what ``accelerate launch`` runs for several processes), leave the
    error line in the worker's error file: the launcher's closing failure summary then shows it as the
    root cause, instead of burying it above its own traceback with a pointer to a guide."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    report = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(report))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failure, 2 usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    try:
        args = build_parser().parse_args(argv)
        verbose = args.verbose
        with quiet_libraries(verbose):
            return args.handler(args) if hasattr(args, "handler") else args.func(args, argv)
    except SystemExit as exc:  # --help and --version print, then exit 0
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except UsageError as exc:
        _error(exc)
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except EasyRefError as exc:
        if verbose:
            traceback.print_exc()
        _error(exc)
        return 1
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            if verbose:
                traceback.print_exc()
            where = f" writing {exc.filename}" if exc.filename else ""
            _error(f"no space left on the disk{where}: free some space and run the command again (outputs are "
                   "written whole or not at all)")
            return 1
        if verbose:
            traceback.print_exc()
            _error(f"unexpected {type(exc).__name__}: {exc}")
        else:
            _error(f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)")
        return 1
