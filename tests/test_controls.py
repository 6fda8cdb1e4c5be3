"""Reference control: a start/end window over the denoising steps, per-layer scales (InstantStyle presets), masks
and several groups in one image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from easyref import adapter
from easyref.cli import main
from easyref.controls import LAYER_PRESETS, ReferenceGroup, active_steps, apply_layer_scales, parse_layers
from easyref.errors import InvalidArgumentError
from easyref.images import image_sha256

from conftest import random_image

STEPS = 4


def _run(pipe, **kwargs):
    refs = [random_image(48, 48, 1), random_image(40, 56, 2)]
    return pipe(refs, "a cat", seed=3, num_inference_steps=STEPS, height=64, width=64, progress=False,
                negative_prompt="", **kwargs)


def _scales_per_step(pipe, slot: int = 0, run=None, **kwargs) -> list[float]:
    """The scale one adapter layer had for group ``slot`` each time the UNet ran (read inside its forward, not
    from the window)."""
    name, processor = next(iter(adapter.adapter_processors(pipe.base.unet).items()))
    layer = pipe.base.unet.get_submodule(name.removesuffix(".processor"))
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(module.processor.scale[slot]))
    try:
        (run or _run)(pipe, **kwargs)
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
    apply_layer_scales(tiny_pipe.base, [2.0], ["style"])
    scales = {name: p.scale[0] for name, p in adapter.adapter_processors(tiny_pipe.base.unet).items()}
    chosen = {name for name in scales if name.startswith("up_blocks.0.attentions.1.")}
    assert chosen and all(scales[name] == 2.0 for name in chosen)
    assert all(value == 0.0 for name, value in scales.items() if name not in chosen)
    apply_layer_scales(tiny_pipe.base, [1.0], [{"down": {"block_1": 1.0}}])
    scales = {name: p.scale[0] for name, p in adapter.adapter_processors(tiny_pipe.base.unet).items()}
    assert {name for name, value in scales.items() if value} == {n for n in scales if n.startswith("down_blocks.1.")}
    apply_layer_scales(tiny_pipe.base, [1.0], [None])
    assert all(p.scale == [1.0] for p in adapter.adapter_processors(tiny_pipe.base.unet).values())


def test_a_preset_whose_blocks_the_unet_lacks_is_refused_not_silently_zero(tiny_pipe):
    with pytest.raises(InvalidArgumentError, match="'composition' selects no adapter layer"):
        _run(tiny_pipe, ref_layers="composition")
    with pytest.raises(InvalidArgumentError, match="finite numbers >= 0"):
        apply_layer_scales(tiny_pipe.base, [1.0], [{"up": {"block_0": [0.0, float("nan"), 0.0]}}])


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


# -- masks and several groups ---------------------------------------------------------------------

GROUP_A = [random_image(48, 48, 1), random_image(40, 56, 2)]
GROUP_B = [random_image(56, 40, 5), random_image(48, 48, 6), random_image(32, 32, 7)]


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=float)


def _groups(pipe, groups, **kwargs):
    return pipe(None, "a cat", seed=3, num_inference_steps=STEPS, height=64, width=64, progress=False,
                negative_prompt="", groups=groups, **kwargs)


def _mask(left: bool = True, right: bool = False) -> Image.Image:
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[:, :32] = 255 if left else 0
    pixels[:, 32:] = 255 if right else 0
    return Image.fromarray(pixels)


def test_a_second_group_at_scale_zero_leaves_the_first_groups_image_unchanged(tiny_pipe):
    alone = _pixels(_run(tiny_pipe, scale=0.7))
    with_b = _pixels(_groups(tiny_pipe, [ReferenceGroup(GROUP_A, scale=0.7), ReferenceGroup(GROUP_B, scale=0.0)]))
    assert np.array_equal(alone, with_b)
    both = _pixels(_groups(tiny_pipe, [ReferenceGroup(GROUP_A, scale=0.7), ReferenceGroup(GROUP_B, scale=0.7)]))
    assert np.abs(both - alone).max() > 0


def test_groups_share_the_adapter_weights_so_one_group_twice_at_half_scale_is_the_group_once(tiny_pipe):
    # decoupled cross-attention adds scale x Attn(q, K_ip, V_ip) per group: with the same projections, two
    # identical groups at 0.5 each sum to the group at 1.0
    once = _pixels(_run(tiny_pipe, scale=1.0))
    twice = _pixels(_groups(tiny_pipe, [ReferenceGroup(GROUP_A, scale=0.5), ReferenceGroup(GROUP_A, scale=0.5)]))
    assert np.abs(once - twice).max() <= 1.0


def test_after_a_several_group_call_the_unet_has_one_slot_again(tiny_pipe):
    before = _pixels(_run(tiny_pipe))
    _groups(tiny_pipe, [ReferenceGroup(GROUP_A), ReferenceGroup(GROUP_B, mask=_mask(), end=0.5, layers="style")])
    unet = tiny_pipe.base.unet
    assert len(unet.encoder_hid_proj.image_projection_layers) == 1
    assert all(len(p.to_k_ip) == len(p.to_v_ip) == 1 for p in adapter.adapter_processors(unet).values())
    assert np.array_equal(before, _pixels(_run(tiny_pipe)))


def test_each_group_keeps_its_own_window(tiny_pipe):
    groups = [ReferenceGroup(GROUP_A, scale=0.5, end=0.5), ReferenceGroup(GROUP_B, scale=2.0, start=0.5)]
    run = lambda pipe: _groups(pipe, groups)  # noqa: E731
    assert _scales_per_step(tiny_pipe, slot=0, run=run) == [0.5, 0.5, 0.0, 0.0]
    assert _scales_per_step(tiny_pipe, slot=1, run=run) == [0.0, 0.0, 2.0, 2.0]


def test_an_all_white_mask_is_no_mask_and_a_half_mask_lies_between_none_and_all(tiny_pipe):
    unmasked = _pixels(_run(tiny_pipe))
    white = _pixels(_run(tiny_pipe, ref_mask=_mask(left=True, right=True)))
    assert np.abs(unmasked - white).max() <= 1.0
    half = _pixels(_run(tiny_pipe, ref_mask=_mask(left=True)))
    assert np.abs(half - unmasked).max() > 1.0 and np.abs(half - _pixels(_run(tiny_pipe, scale=0.0))).max() > 1.0


def test_the_mask_reaches_diffusers_as_its_ip_adapter_masks(tiny_pipe, monkeypatch):
    seen = {}
    real = type(tiny_pipe.base).__call__

    def spy(self, *args, **kwargs):
        seen.update(kwargs.get("cross_attention_kwargs") or {})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_pipe.base), "__call__", spy)
    _groups(tiny_pipe, [ReferenceGroup(GROUP_A), ReferenceGroup(GROUP_B, mask=_mask(left=True))])
    first, second = seen["ip_adapter_masks"]
    assert first is None and second.shape == (1, 1, 64, 64)
    assert second[..., :32].eq(1).all() and second[..., 32:].eq(0).all()


def test_a_black_mask_and_mixed_arguments_are_refused(tiny_pipe, tmp_path):
    _mask(left=False).save(tmp_path / "black.png")
    with pytest.raises(InvalidArgumentError, match="black.png is black everywhere"):
        _run(tiny_pipe, ref_mask=tmp_path / "black.png")
    with pytest.raises(InvalidArgumentError, match="not both"):
        tiny_pipe(GROUP_A, "x", groups=[ReferenceGroup(GROUP_B)])
    with pytest.raises(InvalidArgumentError, match="on each ReferenceGroup"):
        tiny_pipe(None, "x", scale=0.5, groups=[ReferenceGroup(GROUP_B)])
    with pytest.raises(InvalidArgumentError, match="scale must be a finite number"):
        tiny_pipe(None, "x", groups=[ReferenceGroup(GROUP_B, scale=float("nan"))])


def test_the_sidecar_settings_record_every_group(tiny_pipe):
    settings = _groups(tiny_pipe, [ReferenceGroup(GROUP_A, scale=0.5),
                                   ReferenceGroup(GROUP_B, prompt="a style", mask=_mask(), end=0.5)]).settings
    first, second = settings["groups"]
    assert (first["scale"], first["ref_mask"], second["prompt"], second["ref_end"]) == (0.5, None, "a style", 0.5)
    assert second["ref_mask"] == image_sha256(_mask().convert("RGB"))


def test_the_command_line_adds_groups_and_masks(tiny_model, tmp_path, capsys):
    for index, image in enumerate(GROUP_B):
        image.save(tmp_path / f"b{index}.png")
    GROUP_A[0].save(tmp_path / "a.png")
    _mask().save(tmp_path / "left.png")
    _mask(left=False).save(tmp_path / "black.png")
    base = ["generate", "--model", str(tiny_model), "--ref", str(tmp_path / "a.png"), "--prompt", "x",
            "--steps", "2", "--height", "64", "--width", "64"]

    def run(name, *extra):
        assert main([*base, "--output", str(tmp_path / f"{name}.png"), *extra]) == 0
        return np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=float), json.loads(
            (tmp_path / f"{name}.json").read_text())

    alone, _ = run("alone")
    silent, record = run("silent", "--group", f"ref={tmp_path / 'b0.png'}", f"ref={tmp_path / 'b1.png'}", "scale=0")
    assert np.array_equal(alone, silent)
    assert [ref["path"] for ref in record["groups"][0]["references"]] == [str(tmp_path / "b0.png"),
                                                                          str(tmp_path / "b1.png")]
    assert record["settings"]["groups"][1]["scale"] == 0.0
    masked, record = run("masked", "--ref-mask", str(tmp_path / "left.png"), "--group", f"ref={tmp_path}/b2.png",
                         "end=0.5", f"mask={tmp_path / 'left.png'}")
    assert np.abs(masked - alone).max() > 0
    assert record["ref_mask"]["path"] == str(tmp_path / "left.png") and record["groups"][0]["mask"]["sha256"]
    assert record["settings"]["groups"][1]["ref_end"] == 0.5 and record["settings"]["ref_mask"]
    for extra, message in [(["--group", "scale=1"], "needs at least one ref="),
                           (["--group", "ref=a.png", "size=3"], "KEY one of ref, prompt"),
                           (["--group", f"ref={tmp_path / 'a.png'}", "scale=big"], "scale= must be a number"),
                           (["--group", f"ref={tmp_path / 'a.png'}", "scale=-1"], "finite number between 0"),
                           (["--ref-mask", str(tmp_path / "black.png")], "black everywhere")]:
        assert main([*base, "--output", str(tmp_path / "bad.png"), *extra]) == 2  # usage errors
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "bad.png").exists()
