"""Generation through diffusers' pipelines with EasyRef tokens, persistence and loading errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from easyref.errors import HubUnavailableError, ModelFormatError, ShapeMismatchError
from easyref.pipeline import EasyRefPipeline

from conftest import random_image

FAST = {"num_inference_steps": 2, "height": 64, "width": 64, "progress": False}


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_scale_zero_is_exactly_the_base_pipeline(tiny_model, tiny_pipe, references):
    """Scale 0 is the base SDXL pipeline given the same negative text: by default the release's negative
    prompt; an explicit "" is diffusers' own default (SDXL's zero embeddings for the negative branch)."""
    from diffusers import StableDiffusionXLPipeline

    from easyref.config import RELEASE_NEGATIVE_PROMPT

    base = StableDiffusionXLPipeline.from_pretrained(tiny_model / "base")
    base.set_progress_bar_config(disable=True)
    assert base.config.force_zeros_for_empty_prompt

    def base_image(**negative):
        return base("a cat", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(7), **negative).images[0]

    with_release_negative = base_image(negative_prompt=RELEASE_NEGATIVE_PROMPT)
    zeros = base_image()
    default = tiny_pipe(references, "a cat", seed=7, scale=0.0, guidance_scale=5.0, **FAST)
    empty = tiny_pipe(references, "a cat", seed=7, scale=0.0, guidance_scale=5.0, negative_prompt="", **FAST)
    one = tiny_pipe(references, "a cat", seed=7, scale=1.0, guidance_scale=5.0, **FAST).images[0]
    assert np.array_equal(_pixels(default.images[0]), _pixels(with_release_negative))
    assert np.array_equal(_pixels(empty.images[0]), _pixels(zeros))
    assert not np.array_equal(_pixels(zeros), _pixels(with_release_negative))
    assert (default.settings["negative_prompt"], empty.settings["negative_prompt"]) == (RELEASE_NEGATIVE_PROMPT, "")
    assert np.abs(_pixels(one) - _pixels(with_release_negative)).max() > 0


def test_same_seed_same_image_different_seed_different(tiny_pipe, references):
    a = tiny_pipe(references, "a cat", seed=3, **FAST).images[0]
    b = tiny_pipe(references, "a cat", seed=3, **FAST).images[0]
    c = tiny_pipe(references, "a cat", seed=4, **FAST).images[0]
    assert np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(a), _pixels(c))


def test_one_mllm_pass_per_call_and_unconditional_cached(tiny_pipe, references, monkeypatch):
    calls = []
    original = tiny_pipe.encoder.backbone
    monkeypatch.setattr(tiny_pipe.encoder, "backbone", lambda *a, **k: calls.append(1) or original(*a, **k))
    tiny_pipe.clear_cache()
    tiny_pipe(references, "first prompt", **FAST)
    assert len(calls) == 2  # the references and, once, the black-image unconditional branch
    tiny_pipe(references[:2], "second prompt", **FAST)
    assert len(calls) == 3  # only the new references
    tiny_pipe(references[:2], "second prompt", **FAST)
    assert len(calls) == 3  # same group and prompt: served from the cache


def test_negative_references_change_the_image(tiny_pipe, references):
    plain = tiny_pipe(references, "a cat", seed=1, **FAST).images[0]
    negative = tiny_pipe(references, "a cat", seed=1, negative_references=[random_image(64, 64, 9)],
                         **FAST).images[0]
    assert not np.array_equal(_pixels(plain), _pixels(negative))


def test_embeds_reproduce_the_reference_path(tiny_pipe, references):
    embeds = tiny_pipe.encode_references(references, "a cat")
    direct = tiny_pipe(references, "a cat", seed=2, **FAST).images[0]
    cached = tiny_pipe(prompt="a cat", embeds=embeds.clone(), seed=2, **FAST).images[0]
    assert np.array_equal(_pixels(direct), _pixels(cached))


def test_ip_adapter_embeds_layout(tiny_pipe, references):
    (with_guidance,) = tiny_pipe.ip_adapter_embeds(references, "a cat")
    (without,) = tiny_pipe.ip_adapter_embeds(references, "a cat", guidance=False)
    tokens, dim = tiny_pipe.config.num_reference_tokens, tiny_pipe.config.cross_attention_dim
    assert with_guidance.shape == (2, 1, tokens, dim)
    assert without.shape == (1, 1, tokens, dim)
    torch.testing.assert_close(with_guidance[1], without[0])
    torch.testing.assert_close(with_guidance[0, 0], tiny_pipe.unconditional_embeds()[0])


def test_img2img_and_inpainting_take_reference_tokens(tiny_pipe, references):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    init = random_image(64, 64, 11)
    img2img = tiny_pipe.derive(StableDiffusionXLImg2ImgPipeline)
    outs = [tiny_pipe(references, "a cat", seed=0, scale=s, pipeline=img2img, image=init, strength=0.9,
                      **FAST).images[0] for s in (0.0, 1.0)]
    assert outs[0].size == (64, 64)
    assert not np.array_equal(_pixels(outs[0]), _pixels(outs[1]))
    inpaint = tiny_pipe.derive(StableDiffusionXLInpaintPipeline)
    mask = random_image(64, 64, 12).convert("L")
    out = tiny_pipe(references, "a cat", seed=0, pipeline=inpaint, image=init, mask_image=mask, **FAST)
    assert out.images[0].size == (64, 64)


def test_controlnet_sees_text_unet_sees_references(tiny_pipe, references):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    unet_config = dict(tiny_pipe.base.unet.config)
    torch.manual_seed(0)
    controlnet = ControlNetModel(
        block_out_channels=unet_config["block_out_channels"], layers_per_block=2,
        down_block_types=unet_config["down_block_types"], in_channels=4,
        cross_attention_dim=unet_config["cross_attention_dim"],
        attention_head_dim=unet_config["attention_head_dim"], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=unet_config["transformer_layers_per_block"],
        projection_class_embeddings_input_dim=unet_config["projection_class_embeddings_input_dim"],
        conditioning_embedding_out_channels=(16, 32), norm_num_groups=unet_config["norm_num_groups"],
    )
    pipe = tiny_pipe.derive(StableDiffusionXLControlNetPipeline, controlnet=controlnet)
    control = random_image(64, 64, 13)
    outs = [tiny_pipe(references, "a cat", seed=0, scale=s, pipeline=pipe, image=control, **FAST).images[0]
            for s in (0.0, 1.0)]
    assert outs[0].size == (64, 64)
    assert not np.array_equal(_pixels(outs[0]), _pixels(outs[1]))


def test_save_and_load_round_trip(tiny_pipe, references, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "base" / "unet" / "config.json").read_text())[
        "encoder_hid_dim_type"] is None
    again = EasyRefPipeline.from_pretrained(tmp_path / "copy", device="cpu", torch_dtype="float32")
    torch.testing.assert_close(again.encode_references(references, "x"),
                               tiny_pipe.encode_references(references, "x"), rtol=0, atol=0)
    a = tiny_pipe(references, "x", seed=5, **FAST).images[0]
    b = again(references, "x", seed=5, **FAST).images[0]
    assert np.array_equal(_pixels(a), _pixels(b))


def test_lora_round_trip(tiny_model, references, tmp_path):
    torch.manual_seed(0)
    pipe = EasyRefPipeline.create(tiny_model / "base", tiny_model / "mllm", cond_image_size=56, lora_rank=4)
    with torch.no_grad():
        for name, param in pipe.base.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    pipe.save_pretrained(tmp_path / "lora")
    again = EasyRefPipeline.from_pretrained(tmp_path / "lora", device="cpu", torch_dtype="float32")
    lora = {k: v for k, v in again.base.unet.state_dict().items() if "lora_B" in k}
    assert lora and all(v.abs().sum() > 0 for v in lora.values())
    original = pipe.base.unet.state_dict()
    for key, value in lora.items():
        torch.testing.assert_close(value, original[key])
    a = pipe(references, "x", seed=5, **FAST).images[0]
    b = again(references, "x", seed=5, **FAST).images[0]
    assert np.array_equal(_pixels(a), _pixels(b))


def test_embeds_only_pipeline_needs_no_mllm(tiny_model, tiny_pipe, references):
    light = EasyRefPipeline.from_pretrained(tiny_model, load_mllm=False, device="cpu", torch_dtype="float32")
    assert light.encoder is None
    embeds = tiny_pipe.encode_references(references, "a cat")
    uncond = tiny_pipe.unconditional_embeds()
    a = light(prompt="a cat", embeds=embeds, negative_embeds=uncond, seed=1, **FAST).images[0]
    b = tiny_pipe(references, "a cat", seed=1, **FAST).images[0]
    assert np.array_equal(_pixels(a), _pixels(b))
    with pytest.raises(ModelFormatError, match="has no MLLM"):
        light(references, "a cat", **FAST)


def test_free_encoder_keeps_the_encoded_groups_and_refuses_new_ones(tiny_model, references):
    pipe = EasyRefPipeline.from_pretrained(tiny_model, device="cpu", torch_dtype="float32")
    before = pipe(references, "a cat", seed=1, **FAST).images[0]
    pipe.free_encoder()
    assert pipe.encoder is None
    after = pipe(references, "a cat", seed=1, **FAST).images[0]  # from the cache, guidance branch included
    assert np.array_equal(_pixels(after), _pixels(before))
    assert not np.array_equal(_pixels(pipe(references, "a cat", seed=2, **FAST).images[0]), _pixels(before))
    with pytest.raises(ModelFormatError, match="dropped by free_encoder"):
        pipe(references, "a dog", **FAST)


def test_model_folder_missing_a_part(tiny_model, tmp_path):
    shutil.copytree(tiny_model, tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "mllm")
    with pytest.raises(ModelFormatError, match="no mllm/ part"):
        EasyRefPipeline.from_pretrained(tmp_path / "m")


def test_base_part_without_weights_is_named(tiny_model, tmp_path):
    shutil.copytree(tiny_model, tmp_path / "m")
    for weights in (tmp_path / "m" / "base" / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelFormatError, match="unet/ has no weights file"):
        EasyRefPipeline.from_pretrained(tmp_path / "m")


def _break(model_folder, how: str) -> None:
    if how == "unknown class":
        index_path = model_folder / "base" / "model_index.json"
        index = json.loads(index_path.read_text())
        index["unet"] = ["diffusers", "NoSuchUNet2DModel"]
        index_path.write_text(json.dumps(index))
    elif how == "missing part":
        shutil.rmtree(model_folder / "base" / "unet")
    elif how == "no MLLM weights":
        for weights in (model_folder / "mllm").glob("*.safetensors"):
            weights.unlink()
    else:
        (model_folder / "adapter" / "config.json").write_text("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize(("how", "message"), [
    ("unknown class", "model_index.json declares unet as diffusers.NoSuchUNet2DModel, which this diffusers "
                      "does not have"),
    ("missing part", "model_index.json lists unet but there is no unet/ folder"),
    ("no MLLM weights", "MLLM .*mllm has no weights file"),
    ("deep JSON", "adapter/config.json: JSON nested too deeply to read"),
])
def test_a_broken_model_folder_is_named_in_one_sentence(tiny_model, tmp_path, how, message):
    shutil.copytree(tiny_model, tmp_path / "m")
    _break(tmp_path / "m", how)
    with pytest.raises(ModelFormatError, match=message):
        EasyRefPipeline.from_pretrained(tmp_path / "m")


def test_adapter_dimension_mismatch_names_both(tiny_model, tmp_path):
    shutil.copytree(tiny_model / "adapter", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (tmp_path / "adapter" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatchError, match="48.*64"):
        EasyRefPipeline.from_pretrained(tiny_model, adapter=tmp_path / "adapter")
    config["cross_attention_dim"], config["mllm_hidden_size"] = 64, 48
    (tmp_path / "adapter" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatchError, match="48.*32"):
        EasyRefPipeline.from_pretrained(tiny_model, adapter=tmp_path / "adapter")


def test_adapter_weights_with_wrong_token_count(tiny_model, tmp_path):
    from easyref.weights import read_safetensors, save_safetensors

    shutil.copytree(tiny_model / "adapter", tmp_path / "adapter")
    state = read_safetensors(tmp_path / "adapter" / "model.safetensors")
    state["final.reference_tokens"] = state["final.reference_tokens"][:10]
    save_safetensors(tmp_path / "adapter" / "model.safetensors", state)
    with pytest.raises(ShapeMismatchError, match=r"reference_tokens has shape \(10, 32\).*\(64, 32\)"):
        EasyRefPipeline.from_pretrained(tiny_model, adapter=tmp_path / "adapter")


def test_unreachable_hub_id_is_a_clear_error(tiny_model):
    with pytest.raises(HubUnavailableError, match="no-such-org-easyref/no-such-model"):
        EasyRefPipeline.from_pretrained(tiny_model, base="no-such-org-easyref/no-such-model")


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 65}, "height must be a multiple of 8"),
    ({"width": 8}, "width must be a multiple of 8"),
    ({"scale": float("nan")}, "scale must be a finite number"),
    ({"scale": -1.0}, "scale must be a finite number"),
    ({"num_images": 0}, "num_images must be between"),
    ({"num_inference_steps": 0}, "num_inference_steps must be between"),
    ({"seed": -1}, "seed must be a non-negative integer"),
])
def test_bad_generation_arguments(tiny_pipe, references, kwargs, message):
    from easyref.errors import InvalidArgumentError

    args = {**FAST, **kwargs}
    with pytest.raises(InvalidArgumentError, match=message):
        tiny_pipe(references, "a cat", **args)


def test_reference_count_limits(tiny_pipe):
    from easyref.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="got 0 reference images"):
        tiny_pipe.encode_references([], "x")
    too_many = [random_image(8, 8, 0)] * (tiny_pipe.config.max_references + 1)
    with pytest.raises(InvalidArgumentError, match="give between 1 and"):
        tiny_pipe.encode_references(too_many, "x")


def test_adapter_with_weights_the_model_lacks(tiny_model, tmp_path):
    from easyref.weights import read_safetensors, save_safetensors

    shutil.copytree(tiny_model / "adapter", tmp_path / "adapter")
    state = read_safetensors(tmp_path / "adapter" / "model.safetensors")
    state["final.layers.0.bogus.weight"] = torch.zeros(2)
    save_safetensors(tmp_path / "adapter" / "model.safetensors", state)
    with pytest.raises(ModelFormatError, match="final.layers.0.bogus.weight"):
        EasyRefPipeline.from_pretrained(tiny_model, adapter=tmp_path / "adapter")


def test_encode_only_pipeline_needs_no_base(tiny_model, tiny_pipe, references):
    light = EasyRefPipeline.from_pretrained(tiny_model, load_base=False, device="cpu", torch_dtype="float32")
    assert light.base is None
    torch.testing.assert_close(light.encode_references(references, "a cat"),
                               tiny_pipe.encode_references(references, "a cat"), rtol=0, atol=0)
    torch.testing.assert_close(light.unconditional_embeds(), tiny_pipe.unconditional_embeds(), rtol=0, atol=0)
    with pytest.raises(ModelFormatError, match="without the base model"):
        light(references, "a cat", **FAST)


def test_saving_keeps_the_base_pipelines_options(tiny_model, references, tmp_path):
    # A base trained with the encoded "" as its unconditional input (not SDXL's zeros) must keep that.
    pipe = EasyRefPipeline.from_pretrained(tiny_model, device="cpu", torch_dtype="float32")
    pipe.base.register_to_config(force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(tmp_path / "copy")
    again = EasyRefPipeline.from_pretrained(tmp_path / "copy", device="cpu", torch_dtype="float32")
    assert again.base.config.force_zeros_for_empty_prompt is False
    a = pipe(references, "x", seed=5, **FAST).images[0]
    b = again(references, "x", seed=5, **FAST).images[0]
    assert np.array_equal(_pixels(a), _pixels(b))


def test_mllm_precision_is_chosen_apart_from_sdxl(tiny_model, tiny_pipe, references, monkeypatch):
    """The MLLM may run in bfloat16 (the release's choice on GPU) while SDXL keeps its own dtype; its tokens
    reach the UNet in the UNet's dtype and stay close to the float32 encoding."""
    from easyref import devices
    from easyref.pipeline import EasyRefPipeline

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.pick_mllm_dtype(None, cpu, torch.float32) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert devices.pick_mllm_dtype("auto", cuda, torch.float16) == torch.bfloat16
    assert devices.pick_mllm_dtype("auto", cuda, torch.float32) == torch.float32  # full precision asked for
    assert devices.pick_mllm_dtype("float16", cuda, torch.float16) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert devices.pick_mllm_dtype("auto", cuda, torch.float16) == torch.float32

    mixed = EasyRefPipeline.from_pretrained(tiny_model, device="cpu", torch_dtype="float32", mllm_dtype="bfloat16")
    assert mixed.encoder.mllm.dtype == mixed.encoder.dtype == torch.bfloat16
    assert mixed.base.unet.dtype == torch.float32
    low, full = mixed.encode_references(references, "a cat"), tiny_pipe.encode_references(references, "a cat")
    assert torch.nn.functional.cosine_similarity(low.float().flatten(), full.flatten(), dim=0) > 0.98
    assert mixed.ip_adapter_embeds(references, "a cat")[0].dtype == torch.float32
    image = np.asarray(mixed(references, "a cat", seed=1, **FAST).images[0])
    assert image.std() > 0


def test_loading_from_python_is_quiet_unless_easyref_logs_verbosely(tiny_model, capfd):
    """The Python API keeps library chatter (weight-loading bars, info logs) out of the way, as the CLI
    does; the ``easyref`` logger at DEBUG shows it again. The libraries' own settings are restored."""
    import logging

    import diffusers.utils.logging as diffusers_logging

    from easyref.pipeline import EasyRefPipeline

    level = diffusers_logging.get_verbosity()
    capfd.readouterr()
    EasyRefPipeline.from_pretrained(tiny_model, device="cpu")
    assert capfd.readouterr().err == ""
    assert diffusers_logging.get_verbosity() == level and diffusers_logging.is_progress_bar_enabled()
    logger = logging.getLogger("easyref")
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        EasyRefPipeline.from_pretrained(tiny_model, device="cpu")
    finally:
        logger.setLevel(previous)
    assert "Loading" in capfd.readouterr().err


def test_non_finite_latents_or_tokens_stop_generation_with_their_source(tiny_pipe, references, monkeypatch):
    """NaN latents would decode to a black image reported as a success: the step that made them is named.
    The caller's own step callback still runs first."""
    from easyref.errors import NonFiniteError

    seen = []

    def poison_from(first: int):
        def poison(pipe, step, timestep, tensors):
            seen.append(step)
            return {**tensors, "latents": tensors["latents"] * (float("nan") if step >= first else 1.0)}
        return poison

    steps = FAST["num_inference_steps"]
    assert steps >= 2
    for first in (0, steps - 1):
        seen.clear()
        with pytest.raises(NonFiniteError, match=f"NaN or infinite at denoising step {first + 1}:"):
            tiny_pipe(references, "a cat", seed=2, callback_on_step_end=poison_from(first), **FAST)
        assert seen == list(range(steps))  # checked once, after the last step: no GPU wait per step
    tiny_pipe.clear_cache()
    monkeypatch.setattr(tiny_pipe.encoder, "encode", lambda groups, prompts: torch.full((1, 4, 64), float("inf")))
    with pytest.raises(NonFiniteError, match="reference encoder produced NaN or infinite tokens"):
        tiny_pipe.encode_references(references, "a new prompt")
    tiny_pipe.clear_cache()


@pytest.mark.parametrize("field, value, message", [
    ("cond_image_size", "56", "cond_image_size must be a positive integer, got '56'"),
    ("instruction", None, "instruction must be a string, got None"),
    ("cross_attention_dim", True, "cross_attention_dim must be a positive integer, got True"),
    ("num_final_layers", True, "num_final_layers must be a positive integer, got True"),
    ("lora_rank", 2.5, "lora_rank must be a positive integer or null, got 2.5"),
])
def test_adapter_config_fields_are_type_checked(tiny_model, tmp_path, field, value, message):
    """A hand-edited config.json with a wrong type gets one message naming the file and the field."""
    import json
    import shutil

    from easyref.config import EasyRefConfig
    from easyref.errors import ModelFormatError

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_model / "adapter", adapter)
    config = json.loads((adapter / "config.json").read_text())
    (adapter / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ModelFormatError, match=f"config.json: {message}".replace("(", r"\(")):
        EasyRefConfig.load(adapter)
