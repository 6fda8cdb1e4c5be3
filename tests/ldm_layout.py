"""Write a diffusers SDXL pipeline as one checkpoint in the original (LDM / SGM) layout, for tests.

Model sites share SDXL finetunes this way; the tests need one made from a tiny pipeline to check
that a single-file base loads. The key names follow the original repositories' module tree
(``model.diffusion_model`` = openaimodel.UNetModel, ``first_stage_model`` = the autoencoder,
``conditioner.embedders.0`` = OpenAI CLIP-L, ``conditioner.embedders.1`` = OpenCLIP ViT-bigG), written
here by hand rather than with diffusers' own tables, so that loading is checked against an independent
account of the format.
"""

from __future__ import annotations

import re

import torch

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_OPEN_CLIP_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def _rename(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    for new, old in table:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel -> ``model.diffusion_model.*``: input_blocks / middle_block / output_blocks."""
    per_block = unet.config.layers_per_block
    up_has_attention = ["CrossAttn" in kind for kind in unet.config.up_block_types]
    out = {}
    for key, value in unet.state_dict().items():
        top = next((old + key[len(new):] for new, old in _UNET_TOP.items() if key.startswith(new + ".")), None)
        if top is not None:
            name = top
        elif match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            block, kind, layer, rest = match.groups()
            index = 1 + int(block) * (per_block + 1) + int(layer)
            name = f"input_blocks.{index}.0.{_rename(rest, _RESNET)}" if kind == "resnets" \
                else f"input_blocks.{index}.1.{rest}"
        elif match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            name = f"input_blocks.{(int(match[1]) + 1) * (per_block + 1)}.0.op.{match[2]}"
        elif match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            name = f"middle_block.{2 * int(match[1])}.{_rename(match[2], _RESNET)}"
        elif match := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            name = f"middle_block.1.{match[1]}"
        elif match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            block, kind, layer, rest = match.groups()
            index = int(block) * (per_block + 1) + int(layer)
            name = f"output_blocks.{index}.0.{_rename(rest, _RESNET)}" if kind == "resnets" \
                else f"output_blocks.{index}.1.{rest}"
        elif match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            block = int(match[1])
            slot = 2 if up_has_attention[block] else 1
            name = f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv.{match[2]}"
        else:
            raise KeyError(f"no original-layout name for UNet weight {key}")
        out["model.diffusion_model." + name] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """AutoencoderKL -> ``first_stage_model.*``: encoder.down / decoder.up (reversed) / mid.block_1, attn_1."""
    blocks = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        name = key.replace("conv_norm_out", "norm_out")
        if match := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            side, direction, block, layer, rest = match.groups()
            block = int(block) if direction == "down" else blocks - 1 - int(block)
            name = f"{side}.{direction}.{block}.block.{layer}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        elif match := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            name = f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
        elif match := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            name = f"decoder.up.{blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
        elif match := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            name = f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            name = f"{match[1]}.mid.attn_1.{_rename(match[2], _VAE_ATTENTION)}"
            if value.ndim == 2:  # the original attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + name] = value
    return out


def clip_l_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModel -> ``conditioner.embedders.0.transformer.text_model.*`` (transformers' own names)."""
    prefix = "conditioner.embedders.0.transformer."
    return {prefix + (key if key.startswith("text_model.") else "text_model." + key): value
            for key, value in text_encoder.state_dict().items() if not key.endswith("position_ids")}


def open_clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> ``conditioner.embedders.1.model.*`` (OpenCLIP: fused q/k/v, (in, out)
    text projection)."""
    prefix = "conditioner.embedders.1.model."
    state = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
           prefix + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    layers = sorted({int(key.split(".")[2]) for key in state if key.startswith("encoder.layers.")})
    for layer in layers:
        source, target = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[target + f"attn.in_proj_{kind}"] = torch.cat(
                [state.pop(source + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")])
        for key in [key for key in state if key.startswith(source)]:
            out[target + _rename(key[len(source):], _OPEN_CLIP_LAYER)] = state.pop(key)
    leftover = [key for key in state if not key.endswith("position_ids")]
    if leftover:
        raise KeyError(f"no original-layout name for text encoder 2 weights {leftover}")
    return out


def sdxl_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout state dict (what ``save_file`` writes as a single file)."""
    return {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **clip_l_to_ldm(pipe.text_encoder),
            **open_clip_to_ldm(pipe.text_encoder_2)}
