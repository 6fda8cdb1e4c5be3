"""Memory EasyRef needs at the real size, computed from parameter counts (nothing downloaded, nothing run).

The real architectures are built from their published configs (``benchmarks/configs/*.json``: SDXL
base's UNet, VAE and two text encoders; Qwen2-VL-2B-Instruct) on PyTorch's ``meta`` device, which
allocates no memory; EasyRef's parts are added with the project's own code (``install_adapter``,
``ReferenceEncoder``, ``add_lora``), and each stage's trainable set is the one ``easyref train``
trains (``easyref.training.stages.trainable_parts``). The parameter counts of the built models equal
the published ones (SDXL UNet 2,567,463,684; Qwen2-VL-2B 2,208,985,600), which checks the configs.

Memory is then arithmetic, and says so: weights only for inference (activations at 1024² come on
top), and for training the usual mixed-precision accounting per trainable parameter (fp32 weight,
gradient and two AdamW moments: 16 bytes, or with DeepSpeed ZeRO-2 a 2-byte bf16 copy everywhere plus
14 bytes sharded over the GPUs) and 2 bytes per frozen one. Measured numbers need a GPU:
``benchmarks/full_size.py`` is where they will go.

    python benchmarks/hardware.py            # prints the markdown tables of README "Hardware"
    python benchmarks/hardware.py --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from easyref.adapter import add_lora, install_adapter
from easyref.config import EasyRefConfig
from easyref.encoder import ReferenceEncoder
from easyref.training.options import DEFAULT_LORA_RANK
from easyref.training.stages import STAGES, trainable_parts

CONFIGS = Path(__file__).parent / "configs"
GB = 1e9
ZERO_GPUS = 8  # one node, the release's per-node count


def _config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build() -> dict:
    """Every part on the meta device, EasyRef attached as ``easyref train`` attaches it."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config("sdxl_unet"))
        parts = {
            "SDXL UNet": _count(unet),
            "SDXL VAE": _count(AutoencoderKL.from_config(_config("sdxl_vae"))),
            "SDXL text encoders": _count(CLIPTextModel(CLIPTextConfig(**_config("sdxl_text_encoder"))))
            + _count(CLIPTextModelWithProjection(CLIPTextConfig(**_config("sdxl_text_encoder_2")))),
        }
        mllm = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**_config("qwen2_vl_2b")))
        parts["Qwen2-VL-2B"] = _count(mllm.model)  # the LM head is tied to the embeddings and never used
        int8_weights = sum(layer.weight.numel() for layer in mllm.model.modules()
                           if isinstance(layer, torch.nn.Linear))  # what --mllm-quantize int8 stores in 1 byte
        config = EasyRefConfig(mllm_hidden_size=mllm.config.text_config.hidden_size,
                               cross_attention_dim=unet.config.cross_attention_dim)
        encoder = ReferenceEncoder(mllm, None, config)
        install_adapter(unet, config.num_reference_tokens)
        adapter_total = _count(unet) - parts["SDXL UNet"]
        add_lora(unet, DEFAULT_LORA_RANK)
        lora_total = _count(unet) - parts["SDXL UNet"] - adapter_total
    parts["EasyRef head (final-layer copy, tokens, projection)"] = _count(encoder.final) + _count(encoder.projection)
    parts["EasyRef adapter (to_k_ip, to_v_ip)"] = adapter_total
    parts[f"UNet LoRA (rank {DEFAULT_LORA_RANK}, stages 2-3)"] = lora_total
    trainable = {stage: sum(p.numel() for params in trainable_parts(encoder, unet, stage).values() for p in params)
                 for stage in STAGES}
    return {"parameters": parts, "trainable": trainable, "total": sum(parts.values()),
            "mllm_linear_weights": int8_weights}


def memory(counts: dict) -> dict:
    """Inference and training memory in GB, computed from the counts (see the module docstring)."""
    parts, total = counts["parameters"], counts["total"]
    sdxl = parts["SDXL UNet"] + parts["SDXL VAE"] + parts["SDXL text encoders"]
    easyref = total - sdxl - parts["Qwen2-VL-2B"]
    unet_side = parts["SDXL UNet"] + parts["EasyRef adapter (to_k_ip, to_v_ip)"] + parts[
        f"UNet LoRA (rank {DEFAULT_LORA_RANK}, stages 2-3)"]
    mllm_side = parts["Qwen2-VL-2B"] + parts["EasyRef head (final-layer copy, tokens, projection)"]
    inference = {
        "GPU, default (SDXL fp16 + MLLM bf16, all resident)": 2 * total / GB,
        "GPU, --offload model (one part resident at a time: the largest is UNet + adapter + LoRA)":
            2 * max(unet_side, mllm_side) / GB,
        "GPU, from saved embeds (no MLLM loaded)": 2 * (sdxl + easyref - parts[
            "EasyRef head (final-layer copy, tokens, projection)"]) / GB,
        "GPU, MLLM with 8-bit weights (--mllm-quantize int8)": (2 * total - counts["mllm_linear_weights"]) / GB,
        "CPU, float32 (RAM)": 4 * total / GB,
        "CPU, float32, MLLM with 8-bit weights (RAM)": (4 * total - 3 * counts["mllm_linear_weights"]) / GB,
    }
    training = {}
    for stage, count in counts["trainable"].items():
        frozen = total - count
        training[stage] = {
            "trainable": count,
            "one GPU / DDP, per GPU": (16 * count + 2 * frozen) / GB,
            f"DeepSpeed ZeRO-2 over {ZERO_GPUS} GPUs, per GPU": (2 * total + 14 * count / ZERO_GPUS) / GB,
        }
    downloads = {"SDXL base (fp16 weights)": 2 * sdxl / GB, "Qwen2-VL-2B-Instruct (bf16)": 2 * parts[
        "Qwen2-VL-2B"] / GB, "EasyRef checkpoint (fp16 equivalent)": 2 * easyref / GB}
    return {"inference": inference, "training": training, "downloads": downloads}


def markdown(counts: dict, needs: dict) -> str:
    lines = ["| part | parameters |", "|---|---|"]
    lines += [f"| {name} | {value / 1e6:,.0f} M |" for name, value in counts["parameters"].items()]
    lines += ["", "| inference (weights only; activations at 1024² come on top) | GB |", "|---|---|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in needs["inference"].items()]
    zero = f"DeepSpeed ZeRO-2 over {ZERO_GPUS} GPUs, per GPU"
    lines += ["", f"| training stage | trainable | one GPU / DDP, per GPU | ZeRO-2 over {ZERO_GPUS} GPUs, per GPU |",
              "|---|---|---|---|"]
    lines += [f"| {stage} | {row['trainable'] / 1e6:,.0f} M | {row['one GPU / DDP, per GPU']:.1f} GB | "
              f"{row[zero]:.1f} GB |" for stage, row in needs["training"].items()]
    lines += ["", "| download | GB |", "|---|---|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in needs["downloads"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = parser.parse_args()
    counts = build()
    needs = memory(counts)
    print(markdown(counts, needs))
    if args.json:
        Path(args.json).write_text(json.dumps({**counts, **needs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
