"""Tiny, randomly initialised, seeded model folders written through the real ``save_pretrained`` paths.

The project (its tests, its benchmarks, and users checking an install offline) needs model folders
that load with the ordinary ``from_pretrained`` code but that take seconds, not gigabytes. The shapes
follow the dummy components of diffusers' and transformers' own test suites. Tokenizers are built
here from a byte-level vocabulary instead of being downloaded, so nothing touches a model hub.

Every writer seeds torch before building each model, so two calls with the same seed write
identical weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from transformers import (
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from easyref import ip_adapter_format

# A few merges so the tokenizers exercise real BPE merging, not only single bytes.
_CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("i", "n")]
# "Ġ" is the byte-level symbol for a space: GPT-2 style vocabularies merge it into the word after it.
_QWEN2_MERGES = [("t", "h"), ("th", "e"), ("Ġ", "a"), ("Ġ", "th"), ("Ġth", "e"), ("i", "n"), ("Ġ", "in")]

# Qwen2-VL-Instruct's special tokens; they are added tokens, never split by BPE.
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Renders messages as Qwen2-VL-Instruct's own template does for text and image parts: a default
# system turn when none is given, every turn framed by <|im_start|>role ... <|im_end|>, and each image
# as one <|image_pad|> between vision markers (the processor later expands it to the image's patches).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


def byte_level_vocab(
    merges: list[tuple[str, str]], special_tokens: tuple[str, ...], word_suffix: str | None = None
) -> dict[str, int]:
    """Return a BPE vocabulary that can encode any text: the 256 byte-level symbols, the merge results,
    then the special tokens (last, as in the real CLIP and Qwen2 vocabularies).

    Byte-level BPE maps every byte to one printable symbol, so a vocabulary holding all 256 symbols
    never needs an unknown token. CLIP marks the last symbol of a word with ``</w>``, so with a
    ``word_suffix`` each symbol is also present in its suffixed form. Two merges may produce the
    same string (trained merges do); it keeps its first id so the ids stay contiguous.
    """
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    if word_suffix is not None:
        symbols += [symbol + word_suffix for symbol in symbols]
    symbols += [left + right for left, right in merges]
    symbols += special_tokens
    return {symbol: index for index, symbol in enumerate(dict.fromkeys(symbols))}


def _clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """Build a CLIP tokenizer with SDXL's special tokens and its 77-token context.

    SDXL's first tokenizer pads with ``<|endoftext|>`` and its second with ``!``; the caller picks.
    """
    vocab = byte_level_vocab(_CLIP_MERGES, ("<|startoftext|>", "<|endoftext|>"), word_suffix="</w>")
    return CLIPTokenizer(vocab=vocab, merges=_CLIP_MERGES, pad_token=pad_token, model_max_length=77)


def _clip_text_config(tokenizer: CLIPTokenizer, width: int = 32) -> CLIPTextConfig:
    """Tiny CLIP text tower config (as in diffusers' SDXL pipeline tests) sized to ``tokenizer``.

    The token ids matter: CLIP pools the hidden state at the end-of-text token.
    """
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=width,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def write_tiny_base(folder: Path, seed: int = 0, width_2: int = 32) -> None:
    """Write a tiny ``StableDiffusionXLPipeline`` folder that generates a 64x64 image in seconds on CPU.

    The UNet has SDXL's structure (text-time added conditioning, two text encoders whose hidden states
    are concatenated into the cross-attention context) at test-suite size, so code written against
    SDXL runs unchanged. No feature extractor or image encoder is saved. ``width_2`` is the second
    text encoder's width; a single-file checkpoint tells SDXL's two encoders apart by width (768 and
    1280), so a tiny one must make them differ too.
    """
    tokenizer = _clip_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = _clip_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + width_2,  # six size/crop numbers + pooled text_encoder_2
        cross_attention_dim=32 + width_2,  # both text encoders' hidden states, concatenated
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, width_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def qwen2_vl_tokenizer(merges: list[tuple[str, str]] = _QWEN2_MERGES) -> Qwen2Tokenizer:
    """Build a byte-level BPE Qwen2 tokenizer on ``merges`` with Qwen2-VL-Instruct's special tokens and
    chat template (the tiny model's merges by default; ShapesWorld passes merges trained on its world)."""
    return Qwen2Tokenizer(
        vocab=byte_level_vocab(merges, QWEN2_VL_SPECIAL_TOKENS),
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        model_max_length=32768,
    )


def write_tiny_mllm(folder: Path, seed: int = 0, family: str = "qwen2_vl") -> None:
    """Write a tiny Qwen2-VL (or, with ``family="qwen2_5_vl"``, Qwen2.5-VL) folder with its tokenizer
    and PIL image processor.

    The text model has three layers so that "all but the last K layers" selects something non-trivial.
    The image processor caps images at 112x112 pixels (8x8 patches) to keep the vision tower fast;
    load it with ``Qwen2VLImageProcessorPil.from_pretrained`` (the default class needs torchvision).
    Both families share the tokenizer and image processor, as the real models do.
    """
    tokenizer = qwen2_vl_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        # head_dim 8 -> 4 rotary frequencies, split over the temporal, height and width positions.
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e6},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    token_ids = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    vision = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "depth": 2, "num_heads": 4}
    if family == "qwen2_vl":
        model_class = Qwen2VLForConditionalGeneration
        # hidden_size is the merger's output, fed to the text model.
        config = Qwen2VLConfig(text_config=text_config, vision_config={**vision, "embed_dim": 32, "hidden_size": 32},
                               **token_ids)
    elif family == "qwen2_5_vl":
        model_class = Qwen2_5_VLForConditionalGeneration
        # Window attention over 56-pixel windows, with the last block global, as in the real model.
        config = Qwen2_5_VLConfig(text_config=text_config, **token_ids, vision_config={
            **vision, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32, "window_size": 56,
            "fullatt_block_indexes": [1]})
    else:
        raise ValueError(f"unknown family {family!r}; use qwen2_vl or qwen2_5_vl")
    torch.manual_seed(seed)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    ).save_pretrained(folder)


def write_tiny_clip(folder: Path, seed: int = 0) -> None:
    """Write a tiny ``CLIPModel`` (text and vision towers) with its tokenizer and PIL image processor.

    For the image-text benchmark metrics. Load the image processor with
    ``CLIPImageProcessorPil.from_pretrained`` (the default class needs torchvision).
    """
    tokenizer = _clip_tokenizer(pad_token="<|endoftext|>")
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer).to_dict(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,  # read by CLIPVisionModelWithProjection loaded from this folder
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )


def write_tiny_dinov2(folder: Path, seed: int = 0) -> None:
    """Write a tiny ``Dinov2Model`` with its PIL image processor, for the image-image benchmark metrics.

    Load the image processor with ``BitImageProcessorPil.from_pretrained`` (the default class needs
    torchvision).
    """
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(seed)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    ).save_pretrained(folder)


def write_tiny_ip_adapter(folder: Path, base_folder: Path, seed: int = 0) -> Path:
    """Write a tiny IP-Adapter-SDXL for the tiny base in ``base_folder``: ``image_encoder/`` + weights.

    ``image_encoder/`` is a ``CLIPVisionModelWithProjection`` (32x32 images, width 32); the weights
    are a fresh adapter in the original layout (:mod:`easyref.ip_adapter_format`) that diffusers'
    ``load_ip_adapter`` reads.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(config).save_pretrained(folder / ip_adapter_format.IMAGE_ENCODER_FOLDER)
    unet = UNet2DConditionModel.from_pretrained(Path(base_folder) / "unet")
    save_file(ip_adapter_format.initial_state(unet, config.projection_dim, seed=seed),
              str(folder / ip_adapter_format.WEIGHT_NAME))
    return folder


# Small enough that every reference becomes 2x2 merged tokens: encoding stays in milliseconds.
TINY_COND_IMAGE_SIZE = 56


def make_tiny(folder: Path, seed: int = 0, **config_kwargs) -> Path:
    """Write a complete tiny EasyRef model folder: ``base/``, ``mllm/`` and a random ``adapter/``.

    Built through ``EasyRefPipeline.create`` and the adapter writer, so loading it exercises the
    same code paths as a real model. ``config_kwargs`` override EasyRefConfig fields.
    """
    from easyref.pipeline import EasyRefPipeline
    from easyref.weights import save_adapter

    folder = Path(folder)
    write_tiny_base(folder / "base", seed)
    write_tiny_mllm(folder / "mllm", seed)
    torch.manual_seed(seed)
    config_kwargs.setdefault("cond_image_size", TINY_COND_IMAGE_SIZE)
    pipe = EasyRefPipeline.create(folder / "base", folder / "mllm", **config_kwargs)
    save_adapter(folder / "adapter", pipe.config, pipe.encoder, pipe.base.unet)
    return folder
