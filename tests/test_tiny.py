"""The tiny model folders reload through the real ``from_pretrained`` classes and run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    Dinov2Model,
    Qwen2Tokenizer,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from easyref.tiny import (
    QWEN2_VL_SPECIAL_TOKENS,
    write_tiny_base,
    write_tiny_clip,
    write_tiny_dinov2,
    write_tiny_mllm,
)

Writer = Callable[[Path, int], None]


def _base_weights(folder: Path) -> dict[str, torch.Tensor]:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    return {
        f"{name}.{key}": value
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
        for key, value in component.state_dict().items()
    }


def _transformers_weights(model_class: type) -> Callable[[Path], dict[str, torch.Tensor]]:
    def load(folder: Path) -> dict[str, torch.Tensor]:
        model, info = model_class.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        return model.state_dict()

    return load


WRITERS: dict[str, tuple[Writer, Callable[[Path], dict[str, torch.Tensor]]]] = {
    "base": (write_tiny_base, _base_weights),
    "mllm": (write_tiny_mllm, _transformers_weights(Qwen2VLForConditionalGeneration)),
    "clip": (write_tiny_clip, _transformers_weights(CLIPModel)),
    "dinov2": (write_tiny_dinov2, _transformers_weights(Dinov2Model)),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    for name, (writer, _) in WRITERS.items():
        writer(root / name, 0)
    return {name: root / name for name in WRITERS}


@pytest.mark.parametrize("name", list(WRITERS))
def test_same_seed_writes_identical_weights(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    writer, load = WRITERS[name]
    writer(tmp_path / "again", 0)
    writer(tmp_path / "other", 1)
    first, again, other = load(folders[name]), load(tmp_path / "again"), load(tmp_path / "other")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_tiny_base_generates_64px_image(folders: dict[str, Path]) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["base"])
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, CLIPTokenizer)
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == 77
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert pipe.image_encoder is None and pipe.feature_extractor is None
    image = pipe(
        "a red cube", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


def test_qwen2_vl_chat_template(folders: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folders["mllm"])
    assert isinstance(tokenizer, Qwen2Tokenizer)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same dog?"}],
        }
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>Same dog?"
        "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    system_given = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(system_given, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_qwen2_vl_special_tokens_match_config(folders: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folders["mllm"])
    config = Qwen2VLForConditionalGeneration.from_pretrained(folders["mllm"]).config
    ids = {token: tokenizer.encode(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    assert all(len(encoded) == 1 for encoded in ids.values())
    assert ids["<|image_pad|>"] == [config.image_token_id]
    assert ids["<|video_pad|>"] == [config.video_token_id]
    assert ids["<|vision_start|>"] == [config.vision_start_token_id]
    assert ids["<|vision_end|>"] == [config.vision_end_token_id]
    assert tokenizer.eos_token_id == config.text_config.eos_token_id == ids["<|im_end|>"][0]
    assert tokenizer.pad_token_id == config.text_config.pad_token_id == ids["<|endoftext|>"][0]
    assert len(tokenizer) == config.text_config.vocab_size


def test_qwen2_vl_runs_on_two_images(folders: dict[str, Path]) -> None:
    folder = folders["mllm"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    assert isinstance(AutoImageProcessor.from_pretrained(folder), Qwen2VLImageProcessorPil)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    assert model.config.text_config.num_hidden_layers == 3
    images = processor(
        [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (300, 200), "blue")], return_tensors="pt"
    )
    # What the composite processor does: one <|image_pad|> per merged patch of each image.
    merged_patches = [int(grid.prod()) // processor.merge_size**2 for grid in images["image_grid_thw"]]
    text = "".join(f"<|vision_start|>{'<|image_pad|>' * n}<|vision_end|>" for n in merged_patches) + "Same?"
    inputs = tokenizer(text, return_tensors="pt")
    image_tokens = inputs["input_ids"] == model.config.image_token_id
    output = model(
        **inputs,
        mm_token_type_ids=image_tokens.long(),
        pixel_values=images["pixel_values"],
        image_grid_thw=images["image_grid_thw"],
        output_hidden_states=True,
    )
    assert len(output.hidden_states) == 4
    assert output.logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))


def test_clip_and_dinov2_embed_an_image(folders: dict[str, Path]) -> None:
    image = Image.new("RGB", (48, 40), "green")
    clip_processor = CLIPImageProcessorPil.from_pretrained(folders["clip"])
    assert isinstance(AutoImageProcessor.from_pretrained(folders["clip"]), CLIPImageProcessorPil)
    clip = CLIPModel.from_pretrained(folders["clip"])
    pixels = clip_processor(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    text = AutoTokenizer.from_pretrained(folders["clip"])(["a green square"], return_tensors="pt")
    output = clip(pixel_values=pixels, **text)
    assert output.image_embeds.shape == output.text_embeds.shape == (1, 32)

    dino_processor = BitImageProcessorPil.from_pretrained(folders["dinov2"])
    assert isinstance(AutoImageProcessor.from_pretrained(folders["dinov2"]), BitImageProcessorPil)
    pixels = dino_processor(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    assert Dinov2Model.from_pretrained(folders["dinov2"])(pixel_values=pixels).pooler_output.shape == (1, 32)
