"""Where and when the references act: per-layer scales and a start/end window over the denoising steps.

Both ride on diffusers' own mechanisms: the per-layer dictionary is the one
``set_ip_adapter_scale`` accepts (InstantStyle's), and the window switches the adapter's scales
from a step callback (``callback_on_step_end``), so they work in every derived SDXL pipeline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from torch import nn

from easyref import adapter as unet_adapter
from easyref.errors import InvalidArgumentError

# InstantStyle's blocks of SDXL's UNet: the second attention of up_blocks.0 carries style, the second of
# down_blocks.2 the layout. "all" is every cross-attention layer.
LAYER_PRESETS: dict[str, dict[str, Any] | None] = {
    "all": None,
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "composition": {"down": {"block_2": [0.0, 1.0]}},
    "style+composition": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
}


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


def apply_layer_scales(pipeline: Any, scale: float, layers: str | dict[str, Any] | None) -> None:
    """Set every adapter layer's scale: ``scale`` everywhere, or ``scale`` x the dictionary's value in the
    blocks it names and 0 elsewhere (diffusers' rule)."""
    unet = pipeline.unet
    chosen = LAYER_PRESETS.get(layers) if isinstance(layers, str) else layers
    if isinstance(layers, str) and layers not in LAYER_PRESETS:
        raise InvalidArgumentError(f"ref_layers must be one of {', '.join(LAYER_PRESETS)} or a dictionary, "
                                   f"got {layers!r}")
    if chosen is None:
        unet_adapter.set_scale(unet, scale)
        return
    name = f"preset {layers!r}" if isinstance(layers, str) else f"layer dictionary {json.dumps(layers)}"
    try:
        pipeline.set_ip_adapter_scale(_checked(chosen))
    except (ValueError, KeyError, IndexError) as exc:
        raise InvalidArgumentError(f"the {name} does not fit this UNet ({exc}); presets are for SDXL's UNet, "
                                   "give a dictionary of this UNet's blocks instead") from None
    processors = unet_adapter.adapter_processors(unet).values()
    if not any(value for processor in processors for value in processor.scale):
        # diffusers skips blocks a UNet does not have: without this the image would silently be scale 0
        raise InvalidArgumentError(f"the {name} selects no adapter layer of this UNet (its blocks are not there)")
    for processor in processors:
        processor.scale = [value * scale for value in processor.scale]


def active_steps(num_steps: int, start: float, end: float) -> range:
    """The denoising steps (0-based) in which the references act: fraction ``i / num_steps`` in [start, end)."""
    if not (0.0 <= start < end <= 1.0) or not all(math.isfinite(x) for x in (start, end)):
        raise InvalidArgumentError(f"ref_start and ref_end (--ref-start, --ref-end) must satisfy "
                                   f"0 <= start < end <= 1, got {start}, {end}")
    return range(math.ceil(start * num_steps), math.ceil(end * num_steps))


def step_window(unet: nn.Module, steps: range, user_callback: Callable | None) -> Callable:
    """Set step 0's scales now and return diffusers' ``callback_on_step_end`` that sets each next step's
    (then runs ``user_callback``); outside ``steps`` every adapter layer has scale 0."""
    processors = list(unet_adapter.adapter_processors(unet).values())
    active = [list(processor.scale) for processor in processors]

    def set_for(step: int) -> None:
        for processor, scales in zip(processors, active, strict=True):
            processor.scale = list(scales) if step in steps else [0.0] * len(scales)

    def callback(pipe: Any, step: int, timestep: Any, outputs: dict) -> dict:
        set_for(step + 1)
        return user_callback(pipe, step, timestep, outputs) if user_callback is not None else outputs

    set_for(0)
    return callback
