"""Extra SDXL LoRAs next to EasyRef's own: both apply, each at its weight, through diffusers' peft adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict

from easyref import adapter
from easyref.cli import main
from easyref.errors import InvalidArgumentError, ModelFormatError
from easyref.pipeline import EasyRefPipeline

from conftest import random_image

REFS = [random_image(48, 48, 1), random_image(40, 56, 2)]


def _randomise(unet, adapter_name: str, seed: int) -> None:
    """LoRA up-projections start at zero (no effect); give them values so the LoRA visibly acts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def lora_file(tiny_model, tmp_path_factory):
    """A LoRA for the tiny base, saved as diffusers' training scripts save theirs."""
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "base" / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                     adapter_name="style")
    _randomise(unet, "style", 7)
    folder = tmp_path_factory.mktemp("lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="style"))
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture
def pipe(tiny_model):
    """A fresh tiny pipeline whose adapter carries a UNet LoRA of its own, as stage single/multi adapters do."""
    pipe = EasyRefPipeline.from_pretrained(tiny_model, device="cpu", torch_dtype="float32")
    adapter.add_lora(pipe.base.unet, 4)
    _randomise(pipe.base.unet, adapter.LORA_ADAPTER_NAME, 3)
    return pipe


def _pixels(pipe) -> np.ndarray:
    result = pipe(REFS, "a cat", seed=3, num_inference_steps=3, height=64, width=64, progress=False)
    return np.asarray(result.images[0], dtype=float)


def test_an_extra_lora_applies_at_its_weight_and_easyrefs_own_lora_stays_active(pipe, lora_file):
    own_only = _pixels(pipe)
    name = pipe.load_lora(lora_file, weight=0.0)
    assert np.array_equal(_pixels(pipe), own_only)  # loading it at weight 0 changes nothing
    pipe.base.set_adapters([adapter.LORA_ADAPTER_NAME, name], [0.0, 0.0])
    assert np.abs(_pixels(pipe) - own_only).max() > 1  # EasyRef's LoRA was acting
    pipe.set_lora_weight(name, 1.0)
    both = _pixels(pipe)
    assert np.abs(both - own_only).max() > 1
    second = pipe.load_lora(lora_file, weight=1.0, name="again")
    assert second == "again" and np.abs(_pixels(pipe) - both).max() > 1  # the same LoRA twice is twice as strong
    pipe.set_lora_weight("again", 0.0)
    assert np.array_equal(_pixels(pipe), both)
    with pytest.raises(InvalidArgumentError, match="no LoRA named 'other'"):
        pipe.set_lora_weight("other", 1.0)


def test_the_settings_record_the_loras_and_bad_loras_are_refused(pipe, lora_file, tmp_path):
    pipe.load_lora(lora_file, weight=0.5)
    result = pipe(REFS, "a cat", num_inference_steps=1, height=64, width=64, progress=False)
    assert result.settings["loras"] == {"lora_0": {"source": str(lora_file), "weight": 0.5}}
    with pytest.raises(InvalidArgumentError, match="already loaded"):
        pipe.load_lora(lora_file, name="lora_0")
    with pytest.raises(InvalidArgumentError, match="finite number"):
        pipe.load_lora(lora_file, weight=float("inf"))
    not_a_lora = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(2)}, str(not_a_lora))
    with pytest.raises(ModelFormatError, match="other.safetensors does not load into this base model"):
        pipe.load_lora(not_a_lora)


def test_the_command_line_takes_file_and_weight(tiny_model, lora_file, tmp_path, capsys):
    random_image(48, 48, 1).save(tmp_path / "ref.png")
    argv = ["generate", "--model", str(tiny_model), "--ref", str(tmp_path / "ref.png"), "--prompt", "x",
            "--steps", "2", "--height", "64", "--width", "64"]
    assert main([*argv, "--output", str(tmp_path / "a.png"), "--lora", f"{lora_file}:0.5"]) == 0
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["loras"][0]["path"] == str(lora_file) and record["loras"][0]["weight"] == 0.5
    assert len(record["loras"][0]["sha256"]) == 64 and record["settings"]["loras"]["lora_0"]["weight"] == 0.5
    assert main([*argv, "--output", str(tmp_path / "b.png"), "--lora", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err and not (tmp_path / "b.png").exists()
