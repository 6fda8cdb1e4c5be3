"""ShapesWorld's base model: a short run lowers both losses, publishes a folder diffusers' own SDXL pipeline
loads, and EasyRef wraps that folder without changing what it generates when the references are off."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPModel

from easyref.errors import InvalidArgumentError
from easyref.shapes import base, clip, vocab
from easyref.shapes.judge import ShapesJudge
from easyref.shapes.splits import is_held_out
from easyref.tiny import TINY_COND_IMAGE_SIZE, write_tiny_mllm

from conftest import fast_cpu_maths

SEED = 5
STEPS = 30
# The real structure at a few percent of the width, so a run takes seconds.
SMALL = base.BaseSettings(vae_channels=(8, 8, 16), vae_batch=4, unet_channels=(16, 32), unet_heads=(1, 2),
                          unet_batch=8, vae_eval_images=32, joint_steps=1)
PROMPT = "a large red striped star at the top left on a grey grid background"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A world CLIP (untrained: the base only needs its shapes), a judge, and a base trained for a few steps."""
    folder = tmp_path_factory.mktemp("shapes-pretrained")
    tokenizer = vocab.clip_tokenizer()
    clip.build_clip(tokenizer, SEED).save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    torch.manual_seed(SEED)
    ShapesJudge().save_pretrained(folder / "judge")
    with fast_cpu_maths():
        summary = base.pretrain_base(folder / "base", clip=folder / "clip", judge=folder / "judge", steps=STEPS,
                                     seed=SEED, progress=False, settings=SMALL, eval_captions=4)
    return folder, summary


def _sdxl_image(pipe: StableDiffusionXLPipeline, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                guidance_scale=5.0, output_type="np", **kwargs).images[0]


def _denoising_loss(pipe: StableDiffusionXLPipeline) -> float:
    """The training objective on batches training never drew (steps past its end), without gradients."""
    step_loss = base.unet_step_loss(pipe, SMALL, SEED)
    with torch.no_grad():
        return float(np.mean([step_loss(STEPS + k).item() for k in range(4)]))


def test_short_training_improves_reconstruction_and_denoising(pretrained):
    folder, summary = pretrained
    assert all((folder / "work" / f"base-{stage}" / "log.jsonl").is_file() for stage in ("vae", "unet", "joint"))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder / "base")
    torch.manual_seed(SEED)
    untrained_vae = base.build_vae(SMALL)
    with fast_cpu_maths():
        assert summary["vae"]["mse"] < 0.85 * base.reconstruction_report(untrained_vae, SEED, 32)["mse"]
        trained = _denoising_loss(pipe)
        pipe.unet = base.build_unet(SMALL, pipe.text_encoder, pipe.text_encoder_2)
        assert trained < 0.8 * _denoising_loss(pipe)


def test_folder_loads_as_sdxl_and_makes_a_64px_image(pretrained):
    folder, summary = pretrained
    pipe = StableDiffusionXLPipeline.from_pretrained(folder / "base")
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                    + pipe.text_encoder_2.config.hidden_size)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.vae.config.scaling_factor == pytest.approx(summary["vae"]["scaling_factor"])
    with fast_cpu_maths():
        image = _sdxl_image(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    quality = json.loads((folder / "base" / base.QUALITY_FILE).read_text())
    assert quality["parameters"]["unet"] == sum(p.numel() for p in pipe.unet.parameters())


def _text_outputs(text: dict) -> tuple[torch.Tensor, torch.Tensor]:
    ids = text["tokenizer"]([PROMPT], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return (text["text_encoder_2"](ids).text_embeds,
                text["text_encoder"](ids, output_hidden_states=True).hidden_states[-2])


def test_text_encoders_start_as_the_clip_text_tower_and_train_in_the_joint_phase(pretrained, tmp_path):
    folder, _ = pretrained
    world_clip = CLIPModel.from_pretrained(folder / "clip")
    start = base.load_text_encoders(folder / "clip")
    ids = start["tokenizer"]([PROMPT], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = (world_clip.get_text_features(input_ids=ids).pooler_output,
                    world_clip.text_model(ids, output_hidden_states=True).hidden_states[-2])
    for got, want in zip(_text_outputs(start), expected, strict=True):
        torch.testing.assert_close(got, want)
    trained = StableDiffusionXLPipeline.from_pretrained(folder / "base")
    assert all(not torch.allclose(got, want) for got, want in zip(_text_outputs(trained.components), expected,
                                                                  strict=True))
    frozen = dataclasses.replace(SMALL, joint_steps=0)  # the default: no second phase
    with fast_cpu_maths():
        base.pretrain_base(tmp_path / "base", clip=folder / "clip", steps=3, seed=SEED, progress=False,
                           settings=frozen)
    kept = StableDiffusionXLPipeline.from_pretrained(tmp_path / "base")
    for got, want in zip(_text_outputs(kept.components), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_a_rerun_reuses_the_finished_vae_and_refuses_other_settings(pretrained):
    folder, summary = pretrained
    vae, again = base.train_vae(SMALL.with_steps(STEPS), folder / "work" / "base-vae", SEED, progress=False)
    assert again == summary["vae"]
    assert vae.config.scaling_factor == summary["vae"]["scaling_factor"]
    with pytest.raises(InvalidArgumentError, match="other settings"):
        base.train_vae(SMALL.with_steps(STEPS + 1), folder / "work" / "base-vae", SEED, progress=False)


def test_vae_batches_are_a_function_of_the_step():
    vae = base.build_vae(SMALL)
    step_loss = base.vae_step_loss(vae, SMALL, SEED)
    with fast_cpu_maths(), torch.no_grad():
        assert step_loss(3).item() == step_loss(3).item() != step_loss(4).item()


def test_evaluation_draws_the_right_splits_and_draws_a_grid(pretrained):
    folder, summary = pretrained
    report = summary["prompt_accuracy"]
    for split in ("held-in", "held-out"):
        assert report[split]["prompt_ok"]["groups"] == 4
        assert 0.0 <= report[split]["prompt_ok"]["mean"] <= 1.0
    assert not any(is_held_out(a) for a in base.caption_attributes("held-in", 50, SEED))
    assert all(is_held_out(a) for a in base.caption_attributes("held-out", 50, SEED))
    with Image.open(folder / "base" / base.GRID_FILE) as grid:
        assert grid.width > 64 and grid.height > 64


def test_easyref_at_scale_zero_generates_exactly_the_base_image(pretrained, tmp_path):
    from easyref.pipeline import EasyRefPipeline

    folder, _ = pretrained
    write_tiny_mllm(tmp_path / "mllm", seed=SEED)
    with fast_cpu_maths():
        bare = _sdxl_image(StableDiffusionXLPipeline.from_pretrained(folder / "base"))
        # ShapesWorld's adapters have no default negative text (its base never saw the release's words)
        pipe = EasyRefPipeline.create(folder / "base", tmp_path / "mllm", cond_image_size=TINY_COND_IMAGE_SIZE,
                                      negative_prompt="")
        reference = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
        out = pipe([reference], PROMPT, seed=0, num_inference_steps=3, guidance_scale=5.0, scale=0.0,
                   progress=False, output_type="np")
    np.testing.assert_allclose(out.images[0], bare, atol=1e-6)
