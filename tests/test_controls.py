"""Reference control: a start/end window over the denoising steps and per-layer scales (InstantStyle presets)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from easyref import adapter
from easyref.cli import main
from easyref.controls import LAYER_PRESETS, active_steps, apply_layer_scales, parse_layers
from easyref.errors import InvalidArgumentError

from conftest import random_image

STEPS = 4


def _run(pipe, **kwargs):
    refs = [random_image(48, 48, 1), random_image(40, 56, 2)]
    return pipe(refs, "a cat", seed=3, num_inference_steps=STEPS, height=64, width=64, progress=False,
                negative_prompt="", **kwargs)


def _scales_per_step(pipe, **kwargs) -> list[float]:
    """The scale one adapter layer had each time the UNet ran (read inside its forward, not from the window)."""
    name, processor = next(iter(adapter.adapter_processors(pipe.base.unet).items()))
    layer = pipe.base.unet.get_submodule(name.removesuffix(".processor"))
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(module.processor.scale[0]))
    try:
        _run(pipe, **kwargs)
    finally:
        handle.remove()
    per_call = len(seen) // STEPS
    return [seen[i * per_call] for i in range(STEPS)]


def test_the_window_switches_the_references_on_and_off_at_the_right_steps(tiny_pipe):
    assert _scales_per_step(tiny_pipe, scale=0.5) == [0.5] * 4
    assert _scales_per_step(tiny_pipe, scale=0.5, ref_end=0.5) == [0.5, 0.5, 0.0, 0.0]
    assert _scales_per_step(tiny_pipe, scale=0.5, ref_start=0.5) == [0.0, 0.0, 0.5, 0.5]
    assert _scales_per_step(tiny_pipe, scale=0.5, ref_start=0.25, ref_end=0.75) == [0.0, 0.5, 0.5, 0.0]


def test_the_full_window_is_the_default_and_a_partial_one_lies_between_none_and_all(tiny_pipe):
    pixels = {name: np.asarray(_run(tiny_pipe, **kwargs).images[0], dtype=float) for name, kwargs in {
        "default": {}, "full": {"ref_start": 0.0, "ref_end": 1.0}, "half": {"ref_end": 0.5}, "none": {"scale": 0.0},
    }.items()}
    assert np.array_equal(pixels["default"], pixels["full"])
    assert np.abs(pixels["half"] - pixels["default"]).max() > 0 and np.abs(pixels["half"] - pixels["none"]).max() > 0


def test_a_user_callback_still_runs_inside_the_window(tiny_pipe):
    steps = []

    def callback(pipe, step, timestep, outputs):
        steps.append(step)
        return outputs

    _run(tiny_pipe, ref_end=0.5, callback_on_step_end=callback)
    assert steps == list(range(STEPS))


def test_the_style_preset_selects_exactly_instantstyles_block(tiny_pipe):
    apply_layer_scales(tiny_pipe.base, 2.0, "style")
    scales = {name: p.scale[0] for name, p in adapter.adapter_processors(tiny_pipe.base.unet).items()}
    chosen = {name for name in scales if name.startswith("up_blocks.0.attentions.1.")}
    assert chosen and all(scales[name] == 2.0 for name in chosen)
    assert all(value == 0.0 for name, value in scales.items() if name not in chosen)
    apply_layer_scales(tiny_pipe.base, 1.0, {"down": {"block_1": 1.0}})
    scales = {name: p.scale[0] for name, p in adapter.adapter_processors(tiny_pipe.base.unet).items()}
    assert {name for name, value in scales.items() if value} == {n for n in scales if n.startswith("down_blocks.1.")}
    apply_layer_scales(tiny_pipe.base, 1.0, None)
    assert all(p.scale == [1.0] for p in adapter.adapter_processors(tiny_pipe.base.unet).values())


def test_a_preset_whose_blocks_the_unet_lacks_is_refused_not_silently_zero(tiny_pipe):
    with pytest.raises(InvalidArgumentError, match="'composition' selects no adapter layer"):
        _run(tiny_pipe, ref_layers="composition")
    with pytest.raises(InvalidArgumentError, match="finite numbers >= 0"):
        apply_layer_scales(tiny_pipe.base, 1.0, {"up": {"block_0": [0.0, float("nan"), 0.0]}})


@pytest.mark.parametrize(("start", "end"), [(0.5, 0.5), (0.6, 0.5), (-0.1, 1.0), (0.0, 1.5), (float("nan"), 1.0)])
def test_a_window_outside_zero_to_one_is_refused(start, end):
    with pytest.raises(InvalidArgumentError, match="0 <= start < end <= 1"):
        active_steps(STEPS, start, end)


def test_layers_parse_as_a_preset_name_or_a_json_object():
    assert parse_layers("style") == "style" and set(LAYER_PRESETS) >= {"all", "style", "composition"}
    assert parse_layers('{"up": {"block_0": [0, 1, 0]}}') == {"up": {"block_0": [0, 1, 0]}}
    for bad in ("styles", "[1, 2]"):
        with pytest.raises(InvalidArgumentError, match="--ref-layers"):
            parse_layers(bad)


def test_the_command_line_records_the_controls_in_the_sidecar(tiny_model, tmp_path, capsys):
    random_image(48, 48, 1).save(tmp_path / "ref.png")
    argv = ["generate", "--model", str(tiny_model), "--ref", str(tmp_path / "ref.png"), "--prompt", "x",
            "--steps", "2", "--height", "64", "--width", "64", "--output", str(tmp_path / "out.png"),
            "--ref-end", "0.5", "--ref-layers", "style"]
    assert main(argv) == 0
    settings = json.loads((tmp_path / "out.json").read_text())["settings"]
    assert (settings["ref_start"], settings["ref_end"], settings["ref_layers"]) == (0.0, 0.5, "style")
    assert main([*argv[:-4], "--ref-start", "0.7", "--ref-end", "0.2"]) == 1
    assert "must satisfy 0 <= start < end <= 1" in capsys.readouterr().err
