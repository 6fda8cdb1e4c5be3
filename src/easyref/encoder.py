"""The reference encoder: Qwen2-VL reads the group, EasyRef's reference tokens gather it.

Data flow for one group (``aggregation="tokens"``)::

    images ─ vision tower ─┐
    chat text ─ embeddings ┴─ language model, all but the last K layers, final norm
        ─ [prefix ; N reference tokens] ─ trainable copy of the last K layers + norm
        ─ outputs at the reference-token positions ─ projection MLP ─ (N, cross_attention_dim)

Positions are plain 1-D (0..n-1 on all three M-RoPE sections), counted from each row's first
real token; the backbone ends with the model's own final norm and the trainable copy applies its
norm again. Both are what the public release computes (METHOD.md §4), which keeps its weights
usable as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from PIL import Image
from torch import nn
from transformers.masking_utils import create_causal_mask

from easyref.config import EasyRefConfig
from easyref.errors import ShapeMismatchError
from easyref.prompting import ReferenceProcessor

VisionBatching = Literal["auto", "batched", "loop"]


def make_projection(hidden_size: int, cross_attention_dim: int) -> nn.Sequential:
    """Linear(h, h) → GELU → Linear(h, d) → LayerNorm(d); indices match the release's ``proj.*``."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size),
        nn.GELU(),
        nn.Linear(hidden_size, cross_attention_dim),
        nn.LayerNorm(cross_attention_dim),
    )


class FinalLayers(nn.Module):
    """Trainable copy of the MLLM's last K decoder layers and final norm, plus the reference tokens."""

    def __init__(self, language_model: nn.Module, num_layers: int, num_tokens: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in language_model.layers[-num_layers:])
        self.norm = copy.deepcopy(language_model.norm)
        hidden = language_model.config.hidden_size
        weight = language_model.norm.weight
        self.reference_tokens = nn.Parameter(
            0.1 * torch.randn(num_tokens, hidden, device=weight.device, dtype=weight.dtype)
        )
        for param in self.parameters():
            param.requires_grad_(True)


def _reference_tokens_see_each_other(prefix_length: int):
    """Mask function (transformers' masking_utils protocol) opening reference↔reference attention."""

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        return (q_idx >= prefix_length) & (kv_idx >= prefix_length)

    return mask


class ReferenceEncoder(nn.Module):
    """Qwen2-VL backbone + EasyRef head: groups of images and prompts → conditioning tokens.

    ``mllm`` is a loaded ``Qwen2VLForConditionalGeneration`` (or Qwen2.5-VL); only its
    ``.model`` (vision tower + language model) is kept: the LM head is never used.
    """

    def __init__(self, mllm: nn.Module, processor: ReferenceProcessor, config: EasyRefConfig,
                 vision_batching: VisionBatching = "auto") -> None:
        super().__init__()
        self.mllm = mllm.model
        # Kept unregistered so .to() never moves the unused LM head; only save_pretrained needs it.
        self.__dict__["_full_mllm"] = mllm
        self.processor = processor
        self.config = config
        self.vision_batching = vision_batching
        self.quantization: str | None = None  # set by easyref.quantize
        text_config = self.language_model.config
        if text_config.hidden_size != config.mllm_hidden_size:
            raise ShapeMismatchError(
                f"adapter expects MLLM hidden size {config.mllm_hidden_size}, "
                f"the MLLM has {text_config.hidden_size}"
            )
        if not 1 <= config.num_final_layers < text_config.num_hidden_layers:
            raise ShapeMismatchError(
                f"num_final_layers={config.num_final_layers} needs an MLLM with more layers; "
                f"it has {text_config.num_hidden_layers}"
            )
        self.final = FinalLayers(self.language_model, config.num_final_layers, config.num_reference_tokens)
        self.projection = make_projection(config.mllm_hidden_size, config.cross_attention_dim).to(
            device=self.final.reference_tokens.device, dtype=self.final.reference_tokens.dtype
        )

    @property
    def language_model(self) -> nn.Module:
        return self.mllm.language_model

    @property
    def device(self) -> torch.device:
        return self.final.reference_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.final.reference_tokens.dtype

    def mllm_for_saving(self) -> nn.Module:
        """The whole ``...ForConditionalGeneration`` model (its ``.model`` is ``self.mllm``)."""
        return self._full_mllm

    def head_modules(self) -> dict[str, nn.Module]:
        """The parts EasyRef adds on the MLLM side (saved in the adapter, trained in every stage)."""
        return {"final": self.final, "projection": self.projection}

    # -- the MLLM prefix ---------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision-tower tokens for all images, concatenated in order.

        ``batched`` runs the tower once over every image; ``loop`` once per image (what the
        release does). Both compute the same numbers. ``auto`` picks the loop on CPU, where the
        tower's per-image attention split makes one large call no faster, and the batched call
        elsewhere.
        """
        visual = self.mllm.visual
        pixel_values = pixel_values.to(device=self.device, dtype=visual.dtype)
        image_grid_thw = image_grid_thw.to(self.device)
        mode = self.vision_batching
        if mode == "auto":
            mode = "loop" if pixel_values.device.type == "cpu" else "batched"
        if mode == "batched" or len(image_grid_thw) == 1:
            return visual(pixel_values, grid_thw=image_grid_thw).pooler_output
        patches = image_grid_thw.prod(-1).tolist()
        outputs, start = [], 0
        for i, count in enumerate(patches):
            chunk = pixel_values[start:start + count]
            outputs.append(visual(chunk, grid_thw=image_grid_thw[i:i + 1]).pooler_output)
            start += count
        return torch.cat(outputs)

    def backbone(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Hidden states after all but the last K layers and the model's final norm."""
        lm = self.language_model
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        embeds = lm.embed_tokens(input_ids)
        image_embeds = self.encode_images(pixel_values, image_grid_thw).to(embeds.dtype)
        image_mask = (input_ids == self.mllm.config.image_token_id).unsqueeze(-1)
        if int(image_mask.sum()) != image_embeds.shape[0]:
            raise ValueError(
                f"{int(image_mask.sum())} image placeholders but {image_embeds.shape[0]} image tokens"
            )
        hidden = embeds.masked_scatter(image_mask, image_embeds)
        return self._run_layers(lm.layers[: len(lm.layers) - self.config.num_final_layers], lm.norm,
                                hidden, attention_mask, or_mask_function=None)

    def _run_layers(self, layers, norm: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                    or_mask_function) -> torch.Tensor:
        lm = self.language_model
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        rope = lm.rotary_emb(hidden, positions.unsqueeze(0).expand(3, -1, -1))
        mask = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, or_mask_function=or_mask_function)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope)
        return norm(hidden)

    # -- EasyRef's head ----------------------------------------------------------------------
    def head(self, prefix: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final-layer copy over [prefix ; reference tokens]: (B, N, hidden) at the token positions."""
        batch, length, _ = prefix.shape
        tokens = self.final.reference_tokens.unsqueeze(0).expand(batch, -1, -1).to(prefix.dtype)
        hidden = torch.cat([prefix, tokens], dim=1)
        mask = torch.cat([attention_mask.to(prefix.device), attention_mask.new_ones(batch, tokens.shape[1])
                          .to(prefix.device)], dim=1)
        opening = (_reference_tokens_see_each_other(length)
                   if self.config.reference_attention == "bidirectional" else None)
        out = self._run_layers(self.final.layers, self.final.norm, hidden, mask, or_mask_function=opening)
        return out[:, length:]

    def image_states(self, prefix: torch.Tensor, attention_mask: torch.Tensor,
                     input_ids: torch.Tensor) -> torch.Tensor:
        """``concat`` mode: final-layer outputs at every image-token position of one group."""
        if prefix.shape[0] != 1:
            raise ValueError("concat aggregation encodes one group at a time")
        out = self._run_layers(self.final.layers, self.final.norm, prefix, attention_mask.to(prefix.device),
                               or_mask_function=None)
        is_image = input_ids.to(prefix.device)[0] == self.mllm.config.image_token_id
        return out[:, is_image]

    def aggregate(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  group_sizes: Sequence[int] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """The configured aggregation over backbone outputs, projected (paper Table 5).

        ``tokens``: (rows, N, d), one row per group. ``average``: each row holds ONE reference and
        ``group_sizes`` says how many consecutive rows form a group; the reference-token outputs are
        averaged per group before the projection: (groups, N, d). ``concat``: a list with one
        (1, T_i, d) tensor per row, T_i = that row's image tokens (lengths differ between groups).
        """
        aggregation = self.config.aggregation
        if aggregation == "concat":
            return [self.projection(self.image_states(prefix[i:i + 1], attention_mask[i:i + 1], input_ids[i:i + 1]))
                    for i in range(prefix.shape[0])]
        states = self.head(prefix, attention_mask)
        if aggregation == "average":
            if group_sizes is None or sum(group_sizes) != states.shape[0]:
                raise ValueError(f"average aggregation needs group sizes summing to {states.shape[0]} rows")
            states = torch.stack([chunk.mean(0) for chunk in states.split(list(group_sizes))])
        return self.projection(states)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Projected conditioning tokens for each row of processor output: (rows, T, cross_attention_dim).

        One row per group; ``concat`` rows must then all have the same number of image tokens.
        """
        prefix = self.backbone(input_ids, attention_mask, pixel_values, image_grid_thw)
        if self.config.aggregation == "average":
            return self.aggregate(prefix, input_ids, attention_mask, [1] * prefix.shape[0])
        out = self.aggregate(prefix, input_ids, attention_mask)
        return torch.cat(out) if isinstance(out, list) else out

    def encode(self, groups: Sequence[Sequence[Image.Image]], prompts: Sequence[str]) -> torch.Tensor:
        """Conditioning tokens for each (group, prompt): (len(groups), T, cross_attention_dim).

        ``average`` runs each reference as its own row (see :meth:`ReferenceProcessor.rows`).
        """
        return self.encode_rows(self.processor.rows(groups, prompts))

    def encode_rows(self, inputs: dict) -> torch.Tensor:
        """:meth:`encode` after the processor: the model's whole share of the work (what benchmarks time)."""
        inputs = dict(inputs)
        sizes = inputs.pop("group_sizes", None)
        prefix = self.backbone(**inputs)
        out = self.aggregate(prefix, inputs["input_ids"], inputs["attention_mask"], sizes)
        return torch.cat(out) if isinstance(out, list) else out
