"""The UNet side of EasyRef, built from diffusers' own IP-Adapter machinery.

Every cross-attention layer gets diffusers' ``IPAdapterAttnProcessor2_0`` (decoupled cross
attention: ``Attn(q, K_text, V_text) + scale · Attn(q, to_k_ip(ref), to_v_ip(ref))``) and the UNet
gets a pass-through ``encoder_hid_proj``. The reference tokens are projected on the encoder
side, so what enters ``ip_adapter_image_embeds`` is already (tokens, cross_attention_dim) and
any diffusers SDXL pipeline that accepts IP-Adapter embeds (text-to-image, img2img,
inpainting, ControlNet) conditions on them unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from torch import nn

LORA_ADAPTER_NAME = "easyref"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _cross_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, Attention) and module.is_cross_attention}


def install_adapter(unet: nn.Module, num_tokens: int, scale: float = 1.0) -> None:
    """Give ``unet`` EasyRef's decoupled cross-attention; to_k_ip / to_v_ip start as to_k / to_v.

    Idempotent: a UNet that already carries the processors is left as it is.
    """
    if is_installed(unet):
        return
    processors = dict(unet.attn_processors)
    for name, attn in _cross_attention_layers(unet).items():
        processor = IPAdapterAttnProcessor2_0(
            hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features,
            num_tokens=(num_tokens,),
            scale=scale,
        ).to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
        with torch.no_grad():
            processor.to_k_ip[0].weight.copy_(attn.to_k.weight)
            processor.to_v_ip[0].weight.copy_(attn.to_v.weight)
        processors[f"{name}.processor"] = processor
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([nn.Identity()])
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def is_installed(unet: nn.Module) -> bool:
    return isinstance(getattr(unet, "encoder_hid_proj", None), MultiIPAdapterImageProjection) and any(
        isinstance(p, IPAdapterAttnProcessor2_0) for p in unet.attn_processors.values()
    )


def adapter_processors(unet: nn.Module) -> dict[str, IPAdapterAttnProcessor2_0]:
    return {name: p for name, p in unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)}


def set_scale(unet: nn.Module, scale: float) -> None:
    """Set the reference strength in every adapter layer (0 switches the adapter path off)."""
    for processor in adapter_processors(unet).values():
        processor.scale = [scale]


@contextlib.contextmanager
def group_slots(unet: nn.Module, count: int) -> Iterator[None]:
    """Let one generation carry ``count`` reference groups through the same adapter weights.

    Inside, the UNet looks to diffusers like one with ``count`` IP-Adapters whose projections are all
    EasyRef's ``to_k_ip`` / ``to_v_ip`` (the same modules, not copies), so ``ip_adapter_image_embeds``,
    per-adapter scales and ``ip_adapter_masks`` take one entry per group. Leaving restores one slot.
    """
    processors = list(adapter_processors(unet).values())
    saved = [(processor.to_k_ip, processor.to_v_ip, processor.scale) for processor in processors]
    projection = unet.encoder_hid_proj
    try:
        for processor in processors:
            processor.to_k_ip = nn.ModuleList([processor.to_k_ip[0]] * count)
            processor.to_v_ip = nn.ModuleList([processor.to_v_ip[0]] * count)
            processor.scale = [processor.scale[0]] * count
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([nn.Identity() for _ in range(count)])
        yield
    finally:
        for processor, (to_k_ip, to_v_ip, scale) in zip(processors, saved, strict=True):
            processor.to_k_ip, processor.to_v_ip, processor.scale = to_k_ip, to_v_ip, scale
        unet.encoder_hid_proj = projection


def add_lora(unet: nn.Module, rank: int) -> None:
    """Add a peft LoRA of ``rank`` on the attention projections of every UNet attention layer.

    ``lora_alpha = rank`` gives a scaling of 1, which is how the release's LoRA computes
    (up(down(x)) added without scaling).
    """
    from peft import LoraConfig

    if LORA_ADAPTER_NAME in getattr(unet, "peft_config", {}):
        return
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True)
    unet.add_adapter(config, adapter_name=LORA_ADAPTER_NAME)


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    if LORA_ADAPTER_NAME not in getattr(unet, "peft_config", {}):
        return {}
    return get_peft_model_state_dict(unet, adapter_name=LORA_ADAPTER_NAME)


def load_lora_state_dict(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=LORA_ADAPTER_NAME)
    unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora" in key]
    if unexpected:
        raise KeyError(f"LoRA weights for layers the UNet does not have: {unexpected[:3]}")
