"""Where and when the references act: per-layer scales, a start/end window over the denoising steps, a mask,
and several groups in one image.

All ride on diffusers' own mechanisms: the per-layer dictionary is the one ``set_ip_adapter_scale``
accepts (InstantStyle's), the window switches the adapter's scales from a step callback
(``callback_on_step_end``), masks are diffusers' ``ip_adapter_masks``, and several groups are its
several-IP-Adapter path; so they work in every derived SDXL pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easyref import adapter as unet_adapter
from easyref.errors import InvalidArgumentError
from easyref.images import ImageSource, image_sha256, load_image

# InstantStyle's blocks of SDXL's UNet: the second attention of up_blocks.0 carries style, the second of
# down_blocks.2 the layout. "all" is every cross-attention layer.
LAYER_PRESETS: dict[str, dict[str, Any] | None] = {
    "all": None,
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "composition": {"down": {"block_2": [0.0, 1.0]}},
    "style+composition": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
}


@dataclasses.dataclass
class ReferenceGroup:
    """One group of references and how it acts. Several groups (say an identity and a style) condition one
    image through the same adapter weights, each encoded by the MLLM on its own, each with its own
    strength, region, steps and layers.

    ``references`` or precomputed ``embeds`` (from ``encode_references``); ``prompt`` is what the MLLM
    reads with the group (``None``: the generation prompt); ``mask`` is an image, white where the group
    acts (stretched to the output size); ``start`` / ``end`` and ``layers`` as ``ref_start`` /
    ``ref_end`` and ``ref_layers``.
    """

    references: Sequence[ImageSource] | None = None
    embeds: torch.Tensor | None = None
    prompt: str | None = None
    scale: float = 1.0
    mask: ImageSource | None = None
    start: float = 0.0
    end: float = 1.0
    layers: str | dict[str, Any] | None = None


def load_mask(source: ImageSource, height: int, width: int) -> tuple[torch.Tensor, str]:
    """diffusers' ``ip_adapter_masks`` entry for one group, ``(1, 1, height, width)`` of 0 / 1, and the hash of
    the image's pixels (for the sidecar: a file name alone would not reproduce it).

    A mask with no white pixel is refused: the group would silently act nowhere (often an inverted mask).
    """
    from diffusers.image_processor import IPAdapterMaskProcessor

    image = load_image(source)
    mask = IPAdapterMaskProcessor().preprocess(image, height=height, width=width)
    if not bool(mask.any()):
        name = source if isinstance(source, (str, Path)) else "the mask image"
        raise InvalidArgumentError(f"mask {name} is black everywhere: the references would act nowhere "
                                   "(white marks where they act)")
    return mask, image_sha256(image)


def parse_layers(text: str) -> str | dict[str, Any]:
    """A preset name, or the per-block dictionary as JSON (``'{"up": {"block_0": [0, 1, 0]}}'``)."""
    if text in LAYER_PRESETS:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidArgumentError(f"--ref-layers must be one of {', '.join(LAYER_PRESETS)} or a JSON object like "
                                   f"'{json.dumps(LAYER_PRESETS['style'])}', got {text!r}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"--ref-layers JSON must be an object of blocks, got {text!r}")
    return value


def _checked(layers: Any) -> Any:
    """The dictionary with every scale a finite float (diffusers would take a string or NaN as given)."""
    if isinstance(layers, dict):
        return {key: _checked(value) for key, value in layers.items()}
    if isinstance(layers, list):
        return [_checked(value) for value in layers]
    if isinstance(layers, (int, float)) and not isinstance(layers, bool) and math.isfinite(layers) and layers >= 0:
        return float(layers)
    raise InvalidArgumentError(f"layer scales must be finite numbers >= 0, in lists or objects of blocks, "
                               f"got {layers!r}")


def _preset(layers: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if isinstance(layers, str):
        if layers not in LAYER_PRESETS:
            raise InvalidArgumentError(f"ref_layers must be one of {', '.join(LAYER_PRESETS)} or a dictionary, "
                                       f"got {layers!r}")
        return LAYER_PRESETS[layers]
    return layers


def apply_layer_scales(pipeline: Any, scales: Sequence[float], layers: Sequence[str | dict[str, Any] | None]) -> None:
    """Set every adapter layer's scale for each group slot: group ``j``'s ``scales[j]`` everywhere, or
    ``scales[j]`` x its dictionary's value in the blocks it names and 0 elsewhere (diffusers' rule)."""
    processors = list(unet_adapter.adapter_processors(pipeline.unet).values())
    chosen = [_preset(layer) for layer in layers]
    if all(layer is None for layer in chosen):
        for processor in processors:
            processor.scale = [float(scale) for scale in scales]
        return
    configs = [1.0 if layer is None else _checked(layer) for layer in chosen]
    names = [f"preset {layer!r}" if isinstance(layer, str) else f"layer dictionary {json.dumps(layer)}"
             for layer in layers]
    try:
        pipeline.set_ip_adapter_scale(configs)
    except (ValueError, KeyError, IndexError) as exc:
        name = next(name for name, layer in zip(names, chosen, strict=True) if layer is not None)
        raise InvalidArgumentError(f"the {name} does not fit this UNet ({exc}); presets are for SDXL's UNet, "
                                   "give a dictionary of this UNet's blocks instead") from None
    for slot, (name, layer) in enumerate(zip(names, chosen, strict=True)):
        if layer is not None and not any(processor.scale[slot] for processor in processors):
            # diffusers skips blocks a UNet does not have: without this the image would silently be scale 0
            raise InvalidArgumentError(f"the {name} selects no adapter layer of this UNet (its blocks are not there)")
    for processor in processors:
        processor.scale = [value * scale for value, scale in zip(processor.scale, scales, strict=True)]


def active_steps(num_steps: int, start: float, end: float) -> range:
    """The denoising steps (0-based) in which the references act: fraction ``i / num_steps`` in [start, end)."""
    if not (0.0 <= start < end <= 1.0) or not all(math.isfinite(x) for x in (start, end)):
        raise InvalidArgumentError(f"ref_start and ref_end (--ref-start, --ref-end) must satisfy "
                                   f"0 <= start < end <= 1, got {start}, {end}")
    return range(math.ceil(start * num_steps), math.ceil(end * num_steps))


def step_window(unet: nn.Module, windows: Sequence[range], user_callback: Callable | None) -> Callable:
    """Set step 0's scales now and return diffusers' ``callback_on_step_end`` that sets each next step's
    (then runs ``user_callback``); group slot ``j`` has scale 0 in every layer outside ``windows[j]``."""
    processors = list(unet_adapter.adapter_processors(unet).values())
    active = [list(processor.scale) for processor in processors]

    def set_for(step: int) -> None:
        for processor, scales in zip(processors, active, strict=True):
            processor.scale = [scale if step in window else 0.0 for scale, window in zip(scales, windows, strict=True)]

    def callback(pipe: Any, step: int, timestep: Any, outputs: dict) -> dict:
        set_for(step + 1)
        return user_callback(pipe, step, timestep, outputs) if user_callback is not None else outputs

    set_for(0)
    return callback
