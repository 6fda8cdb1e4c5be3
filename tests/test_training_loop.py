"""The training loop in one process: it learns, and it writes what a user and ``--resume`` need."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from easyref.cli import main
from easyref.pipeline import EasyRefPipeline
from easyref.training.options import Augmentations, TrainOptions

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def pattern(jitter: int) -> Image.Image:
    """Red left half, blue right half, a grey bar of ``jitter`` rows on top (group members differ a little)."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32] = (230, 40, 40)
    pixels[:, 32:] = (40, 40, 230)
    pixels[:jitter] = 128
    return Image.fromarray(pixels)


@pytest.fixture
def group(tmp_path):
    for i in range(3):
        pattern(2 * i).save(tmp_path / f"{i}.png")
    data = tmp_path / "group.json"
    data.write_text(json.dumps([{"image_file": ["0.png", "1.png"], "text": ["a photo"], "target": "2.png"}] * 2))
    return data


@pytest.fixture
def model_with_full_resolution_attention(tiny_model, tmp_path):
    """The tiny model with a UNet that has attention at both of its resolutions.

    The standard tiny UNet has attention only at its lower resolution, so the parts EasyRef trains
    (adapter and attention LoRA) cannot reach its full-resolution path and no amount of training
    lets them fit an image. With attention at both levels, what the method trains can overfit.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from easyref.weights import save_adapter

    sd = StableDiffusionXLPipeline.from_pretrained(tiny_model / "base")
    config = {**sd.unet.config, "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), "transformer_layers_per_block": (1, 1)}
    torch.manual_seed(0)
    sd = StableDiffusionXLPipeline(**{**sd.components, "unet": UNet2DConditionModel.from_config(config)})
    model = tmp_path / "model"
    sd.save_pretrained(model / "base")
    shutil.copytree(tiny_model / "mllm", model / "mllm")
    torch.manual_seed(0)
    pipe = EasyRefPipeline.create(model / "base", model / "mllm", cond_image_size=56)
    save_adapter(model / "adapter", pipe.config, pipe.encoder, pipe.base.unet)
    return model


def latent_distance(model, adapter, root) -> float:
    """Mean squared distance between generated latents (2 seeds) and the target's latent."""
    pipe = EasyRefPipeline.from_pretrained(base=model / "base", mllm=model / "mllm", adapter=adapter,
                                           device="cpu", torch_dtype="float32")
    pipe.base.set_progress_bar_config(disable=True)
    references = [Image.open(root / f"{i}.png") for i in range(2)]
    target = torch.from_numpy(np.array(Image.open(root / "2.png").convert("RGB"))).permute(2, 0, 1)[None]
    with torch.no_grad():
        target_latent = pipe.base.vae.encode(target.float() / 127.5 - 1).latent_dist.mean
        target_latent = target_latent * pipe.base.vae.config.scaling_factor
        embeds = pipe.ip_adapter_embeds(references, "a photo", guidance=False)
        distances = []
        for seed in range(2):
            latents = pipe.base(prompt="a photo", ip_adapter_image_embeds=embeds, num_inference_steps=10,
                                guidance_scale=1.0, height=64, width=64, output_type="latent",
                                generator=torch.Generator().manual_seed(seed)).images
            distances.append(float(((latents - target_latent) ** 2).mean()))
    return float(np.mean(distances))


def test_overfitting_one_group_lowers_the_loss_and_moves_generation_to_the_target(
        model_with_full_resolution_attention, group, tmp_path):
    from easyref.training.loop import train

    model = model_with_full_resolution_attention
    augment = Augmentations(resolution=64, drop_text=0, drop_references=0, drop_both=0, truncate_probability=0,
                            crop="center")
    adapter = train(TrainOptions(
        stage="multi", data=group, output=tmp_path / "run", model=str(model), init=model / "adapter",
        max_steps=30, save_steps=1000, batch_size=2, gradient_accumulation_steps=1, learning_rate=3e-3,
        max_grad_norm=0.0, resolution=64, augment=augment, lora_rank=16, num_workers=0, log_steps=1,
        progress=False, seed=0))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    ratio = np.mean(losses[-5:]) / np.mean(losses[:5])
    assert ratio < 0.8, f"loss fell only to {ratio:.2f} of its start"
    untrained = latent_distance(model, model / "adapter", group.parent)
    trained = latent_distance(model, adapter, group.parent)
    print(f"overfit: loss ratio {ratio:.2f}; latent distance to target {untrained:.1f} untrained, "
          f"{trained:.1f} trained")
    assert trained < 0.8 * untrained, f"trained {trained:.1f} vs untrained {untrained:.1f}"


@pytest.fixture
def pairs(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (72, 64 + 8 * i, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    data = tmp_path / "pairs.json"
    records = [{"image_file": [f"{i}.png"], "text": [f"photo {i}"], "target": f"{i}.png"} for i in range(4)]
    records += [{"image_file": ["gone.png"], "text": ["x"], "target": "gone.png"}] * 3
    data.write_text(json.dumps(records))
    return data


def test_a_run_writes_checkpoints_logs_validation_and_a_loadable_adapter(tiny_model, pairs, tmp_path, capsys):
    output = tmp_path / "run"
    argv = ["train", "--stage", "align", "--model", str(tiny_model), "--data", str(pairs), "--output", str(output),
            "--cond-image-size", "56", "--resolution", "64", "--batch-size", "2", "--max-steps", "3",
            "--save-steps", "2", "--keep-checkpoints", "1", "--log-steps", "1", "--validation-steps", "3",
            "--validation-records", "2", "--validation-seeds", "2", "--validation-inference-steps", "2",
            "--num-workers", "0", "--no-progress", "--seed", "3"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "trainable parameters:" in err and "final-layer copy + reference tokens" in err and "frozen" in err
    names = sorted(path.name for path in output.iterdir())
    assert names == ["adapter", "checkpoint-3", "log.jsonl", "run.json", "validation"]  # kept the last 1
    logged = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2, 3]
    assert {"loss", "lr", "samples_per_s", "eta_s", "epoch", "skipped_records", "time"} <= set(logged[0])
    assert logged[-1]["skipped_records"] >= 2  # 6 of the 7 records were drawn, 3 of them name gone.png
    grid = Image.open(output / "validation" / "step-000003.png")
    assert grid.size == (3 * 64 + 2 * 2, 2 * 64 + 2)  # target + 2 seeds per row, 2 rows
    state = json.loads((output / "checkpoint-3" / "training_state.json").read_text())
    assert state["step"] == 3 and state["samples_seen"] == 6 and state["batches_per_epoch"] == 3
    with safe_open(str(output / "checkpoint-3" / "model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
    assert saved and all(key.startswith(("encoder.final.", "encoder.projection.", "unet.")) for key in saved)
    assert all(".processor.to_" in key for key in saved if key.startswith("unet."))  # trainable weights only
    pipe = EasyRefPipeline.from_pretrained(base=tiny_model / "base", mllm=tiny_model / "mllm",
                                           adapter=output / "adapter", device="cpu", torch_dtype="float32")
    assert pipe.config.cond_image_size == 56 and not (output / "adapter" / "mllm.safetensors").exists()

    assert main(argv) == 1  # the same command again: the run has checkpoints
    assert "pass --resume latest" in capsys.readouterr().err
    argv[argv.index("--max-steps") + 1] = "4"
    assert main([*argv, "--resume", "latest"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not list(output.glob(".*tmp"))


def test_gradient_checkpointing_and_accumulation_compute_the_same_step(tiny_model, group, tmp_path):
    """Checkpointing recomputes activations; it must not change the numbers. bf16 runs too."""
    from easyref.training.loop import train

    def run(name, **extra):
        options = {"stage": "multi", "data": group, "output": tmp_path / name, "model": str(tiny_model),
                   "init": tiny_model / "adapter", "max_steps": 1, "batch_size": 1, "resolution": 64,
                   "augment": Augmentations(resolution=64), "lora_rank": 4, "num_workers": 0, "progress": False,
                   "log_steps": 1, "learning_rate": 1e-3, **extra}
        adapter = train(TrainOptions(**options))
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        with safe_open(str(adapter / "model.safetensors"), "pt") as handle:
            weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        return json.loads((tmp_path / name / "log.jsonl").read_text())["loss"], weights

    loss, weights = run("plain", gradient_accumulation_steps=2)
    loss_gc, weights_gc = run("checkpointed", gradient_accumulation_steps=2, gradient_checkpointing=True)
    assert loss_gc == pytest.approx(loss, abs=1e-5)
    assert max(float((weights[key] - weights_gc[key]).abs().max()) for key in weights) < 1e-5
    loss_bf16, _ = run("bf16", gradient_accumulation_steps=1, mixed_precision="bf16", gradient_checkpointing=True)
    assert np.isfinite(loss_bf16)
