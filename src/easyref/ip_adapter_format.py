"""The original IP-Adapter weight layout, which diffusers' ``load_ip_adapter`` reads.

IP-Adapter-SDXL files (h94/IP-Adapter) hold ``image_proj.proj`` (one image embedding → T tokens
of the UNet's cross-attention width) and ``image_proj.norm``, then ``ip_adapter.{k}.to_k_ip`` /
``to_v_ip`` for the UNet's cross-attention layers in ``unet.attn_processors`` order, numbered
1, 3, 5, ... (the original numbering counts self- and cross-attention alike, so cross-attention
gets the odd numbers; diffusers' ``_convert_ip_adapter_attn_to_diffusers`` reads them that way).

Writing this layout, rather than a format of our own, means an IP-Adapter made here (the tiny
test one, or the baseline trained on ShapesWorld) loads with the exact code users run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the models, not with the command line that names these constants
    import torch
    from torch import nn

WEIGHT_NAME = "ip-adapter_sdxl.safetensors"
IMAGE_ENCODER_FOLDER = "image_encoder"
TOKENS = 4  # what diffusers' ImageProjection (the plain IP-Adapter) makes of one image embedding


def _cross_attention_names(unet: nn.Module) -> list[str]:
    return [name.removesuffix(".processor") for name in unet.attn_processors if not name.endswith("attn1.processor")]


def initial_state(unet: nn.Module, embed_dim: int, tokens: int = TOKENS, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fresh IP-Adapter for ``unet``: a random projection, and ``to_k_ip`` / ``to_v_ip`` copied from each
    layer's ``to_k`` / ``to_v`` (as IP-Adapter training starts), so the image path attends like the text path."""
    import torch
    from torch import nn

    cross = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(seed)
    proj = nn.Linear(embed_dim, tokens * cross)
    with torch.no_grad():
        bound = 1 / embed_dim**0.5
        proj.weight.copy_(torch.rand(proj.weight.shape, generator=generator) * 2 * bound - bound)
        proj.bias.copy_(torch.rand(proj.bias.shape, generator=generator) * 2 * bound - bound)
    state = {"image_proj.proj.weight": proj.weight, "image_proj.proj.bias": proj.bias,
             "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    for k, name in enumerate(_cross_attention_names(unet)):
        attn = unet.get_submodule(name)
        state[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = attn.to_k.weight
        state[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = attn.to_v.weight
    return {key: value.detach().float().cpu().clone().contiguous() for key, value in state.items()}


def loaded_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The IP-Adapter that diffusers' ``load_ip_adapter`` installed in ``unet``, back in the original layout."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    state = {"image_proj.proj.weight": projection.image_embeds.weight,
             "image_proj.proj.bias": projection.image_embeds.bias,
             "image_proj.norm.weight": projection.norm.weight, "image_proj.norm.bias": projection.norm.bias}
    for k, name in enumerate(_cross_attention_names(unet)):
        processor = unet.attn_processors[f"{name}.processor"]
        state[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        state[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    return {key: value.detach().float().cpu().clone().contiguous() for key, value in state.items()}
