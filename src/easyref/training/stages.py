"""What each training stage trains (METHOD.md §3), and nothing else.

============  ==============================================================================
stage         trainable parts
============  ==============================================================================
``align``     final-layer copy + reference tokens, projection, adapter (to_k_ip / to_v_ip)
``single``    the above + the whole MLLM + a peft LoRA on the UNet's attention projections
``multi``     same as ``single``
============  ==============================================================================

"The whole MLLM" leaves out its own last K decoder layers: the encoder never runs them (the
trainable final-layer copy takes their place), so they could receive no gradient and would only
make distributed data parallel wait for one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from easyref.errors import InvalidArgumentError

if TYPE_CHECKING:  # torch stays unimported until a model exists: the CLI imports this module at start-up
    from torch import nn

STAGES = ("align", "single", "multi")
STAGE_TITLES = {
    "align": "stage 1: alignment pretraining",
    "single": "stage 2: single-reference finetuning",
    "multi": "stage 3: multi-reference finetuning",
}
PART_FINAL = "final-layer copy + reference tokens"
PART_PROJECTION = "projection"
PART_ADAPTER = "adapter (to_k_ip, to_v_ip)"
PART_MLLM = "MLLM"
PART_LORA = "UNet LoRA"


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise InvalidArgumentError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    return stage


def trains_mllm(stage: str) -> bool:
    """Stages 2 and 3 finetune the MLLM and a UNet LoRA; their adapters carry ``mllm.safetensors``."""
    return check_stage(stage) != "align"


def needs_init(stage: str) -> bool:
    """Stages 2 and 3 continue from the previous stage's adapter."""
    return trains_mllm(stage)


def mllm_parameters(encoder: nn.Module) -> list[nn.Parameter]:
    """The backbone's parameters that the encoder actually runs (all but its last K layers)."""
    skipped = {id(p) for layer in encoder.language_model.layers[-encoder.config.num_final_layers:]
               for p in layer.parameters()}
    return [p for p in encoder.mllm.parameters() if id(p) not in skipped]


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in unet.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def trainable_parts(encoder: nn.Module, unet: nn.Module, stage: str) -> dict[str, list[nn.Parameter]]:
    """Freeze ``encoder`` and ``unet``, unfreeze the stage's parts and return them by part name.

    Stages 2 and 3 need the UNet LoRA already added (``easyref.adapter.add_lora``).
    """
    from easyref import adapter as unet_adapter

    check_stage(stage)
    for module in (encoder, unet):
        module.requires_grad_(False)
    processors = unet_adapter.adapter_processors(unet)
    if not processors:
        raise InvalidArgumentError("the UNet carries no EasyRef adapter processors")
    parts = {
        PART_FINAL: list(encoder.final.parameters()),
        PART_PROJECTION: list(encoder.projection.parameters()),
        PART_ADAPTER: [p for processor in processors.values() for p in processor.parameters()],
    }
    if trains_mllm(stage):
        parts[PART_MLLM] = mllm_parameters(encoder)
        parts[PART_LORA] = lora_parameters(unet)
        if not parts[PART_LORA]:
            raise InvalidArgumentError(f"stage {stage} trains a UNet LoRA, but the UNet has none: add it first")
    for params in parts.values():
        for param in params:
            param.requires_grad_(True)
    return parts


def trainable_counts(parts: dict[str, list[nn.Parameter]]) -> dict[str, int]:
    """{part: number of trainable values}, what the loop prints at start."""
    return {part: sum(p.numel() for p in params) for part, params in parts.items()}


def frozen_counts(modules: dict[str, nn.Module]) -> dict[str, int]:
    """{module: number of frozen values}, for the start-up summary."""
    return {name: sum(p.numel() for p in module.parameters() if not p.requires_grad)
            for name, module in modules.items() if module is not None}
