"""Command-line options that several ``easyref`` commands share, defined once.

Lives below the CLI so that ``cli.py``, ``training/commands.py`` and ``bench/*commands.py`` can all
use it without importing each other.
"""

from __future__ import annotations

import argparse

from easyref.quantize import QUANTIZATIONS
from easyref.release import RELEASE_BASE


def add_verbose(parser: argparse.ArgumentParser, default: object = argparse.SUPPRESS) -> None:
    """``-v``; sub-commands default to SUPPRESS so a ``-v`` before the command stays in force."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default,
        help="show full tracebacks on errors, library warnings and weight-loading progress bars "
             "(default: off)",
    )


def add_model_options(parser: argparse.ArgumentParser, adapter: bool = True) -> argparse._ArgumentGroup:
    """``--model`` plus one override per part; returns the group so a command can add its own."""
    group = parser.add_argument_group("model")
    parts = "base/, mllm/ and adapter/" if adapter else "base/ and mllm/"
    names = ", 'shapesworld' (the bundled miniature model) or 'official' (the authors' release: SDXL base, " \
            "Qwen2-VL-2B-Instruct and their checkpoint, from the Hugging Face cache, converted once)" if adapter else ""
    group.add_argument(
        "--model", metavar="DIR",
        help=f"model folder holding {parts} (as written by 'easyref make-tiny' or "
             f"EasyRefPipeline.save_pretrained), a Hugging Face Hub id{names}",
    )
    group.add_argument("--base", metavar="DIR_ID_OR_FILE",
                       help="SDXL base model: a diffusers folder, a hub id, or a single-file SDXL checkpoint "
                            "(.safetensors, as model sites share finetunes); overrides MODEL/base")
    add_base_config(group)
    group.add_argument("--mllm", metavar="DIR_OR_ID",
                       help="Qwen2-VL model (a transformers folder or hub id); overrides MODEL/mllm")
    if adapter:
        group.add_argument("--adapter", metavar="DIR_OR_ID",
                           help="EasyRef adapter folder (config.json + model.safetensors); "
                                "overrides MODEL/adapter")
    return group


def add_base_config(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--base-config``, for every command whose ``--base`` may be a single-file checkpoint."""
    parser.add_argument("--base-config", metavar="DIR_OR_ID",
                        help="for a single-file --base: the diffusers folder or hub id whose configs and tokenizers "
                             f"describe it (default: {RELEASE_BASE}; only its small config files are downloaded "
                             "when not cached, and a local folder works offline)")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hardware")
    group.add_argument("--device", default="auto", metavar="NAME",
                       help="where to run: auto (this process's GPU under accelerate launch, else CUDA, "
                            "then Apple MPS, else CPU), cpu, cuda, cuda:1, mps (default: auto)")
    group.add_argument("--dtype", default="auto", metavar="NAME",
                       help="SDXL's weight precision: auto (float16 on GPU, float32 on CPU), float32, float16, "
                            "bfloat16 (default: auto)")
    group.add_argument("--mllm-dtype", default="auto", metavar="NAME",
                       help="the MLLM's precision: auto (bfloat16 on a CUDA GPU that has it, as the release; "
                            "Qwen2 overflows in float16; float32 on CPU or with --dtype float32), float32, "
                            "bfloat16, float16 (default: auto)")
    group.add_argument("--mllm-quantize", choices=QUANTIZATIONS, metavar="|".join(QUANTIZATIONS),
                       help="8-bit MLLM weights (torchao, CPU and GPU; pip install 'easyref[quantize]'): about half "
                            "the MLLM's weight memory in bfloat16, a third in float32; docs/BENCHMARKS.md gives the "
                            "drift it costs (default: off)")
    group.add_argument("--offload", choices=("model", "sequential"), metavar="MODE",
                       help="for a GPU too small for every part at once: keep the weights in CPU RAM and lend the GPU "
                            "'model': one whole model at a time (the MLLM while it encodes, then SDXL's parts; peak = "
                            "the largest part), or 'sequential': one layer at a time (least memory, much slower); "
                            "the README's hardware table gives the memory (default: off, every part on the GPU)")


# The sampling flags of 'generate' and 'bench run', by the Python names the pipeline checks them under.
SAMPLING_FLAGS = {"height": "--height", "width": "--width", "scale": "--scale", "guidance_scale": "--guidance-scale",
                  "num_inference_steps": "--steps", "num_images": "--num-images", "seed": "--seed"}
