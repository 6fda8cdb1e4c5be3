"""Which parameters each stage trains (METHOD.md §3), and that every one of them gets a gradient."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from easyref.training import loop, stages
from easyref.training.data import Collator, TrainingDataset
from easyref.training.options import Augmentations, TrainOptions
from easyref.training.records import parse_records

pytestmark = pytest.mark.usefixtures("one_thread")


def pipeline(tiny_model, tmp_path, stage):
    opts = TrainOptions(stage=stage, data=tmp_path / "d.json", output=tmp_path / "run", model=str(tiny_model),
                        init=tiny_model / "adapter", lora_rank=4, resolution=64,
                        augment=Augmentations(resolution=64)).resolved()
    return loop.load_pipeline(opts)


def names(params, module):
    ids = {id(p) for p in params}
    return {name for name, p in module.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("stage", ["align", "multi"])
def test_trainable_parts_per_stage(tiny_model, tmp_path, stage):
    pipe = pipeline(tiny_model, tmp_path, stage)
    encoder, unet = pipe.encoder, pipe.base.unet
    parts = stages.trainable_parts(encoder, unet, stage)
    trainable = {id(p) for group in parts.values() for p in group}
    assert trainable == {id(p) for m in (encoder, unet) for p in m.parameters() if p.requires_grad}
    assert names(parts[stages.PART_FINAL], encoder) == {n for n, _ in encoder.final.named_parameters(prefix="final")}
    assert "final.reference_tokens" in names(parts[stages.PART_FINAL], encoder)
    assert names(parts[stages.PART_PROJECTION], encoder) == {
        n for n, _ in encoder.projection.named_parameters(prefix="projection")}
    adapter_names = names(parts[stages.PART_ADAPTER], unet)
    assert adapter_names and all(".processor.to_k_ip." in n or ".processor.to_v_ip." in n for n in adapter_names)
    frozen_unet = {n for n, p in unet.named_parameters() if not p.requires_grad}
    assert "conv_in.weight" in frozen_unet and not any(".processor." in n for n in frozen_unet)
    counts = stages.trainable_counts(parts)
    assert counts == {part: sum(p.numel() for p in group) for part, group in parts.items()}
    if stage == "align":
        assert set(parts) == {stages.PART_FINAL, stages.PART_PROJECTION, stages.PART_ADAPTER}
        assert not any(p.requires_grad for p in encoder.mllm.parameters())
        assert not any("lora" in n for n in unet.state_dict())
    else:
        assert set(parts) == {stages.PART_FINAL, stages.PART_PROJECTION, stages.PART_ADAPTER, stages.PART_MLLM,
                              stages.PART_LORA}
        last = len(encoder.language_model.layers) - encoder.config.num_final_layers
        mllm = names(parts[stages.PART_MLLM], encoder.mllm)
        assert any(n.startswith("visual.") for n in mllm) and "language_model.embed_tokens.weight" in mllm
        assert not any(n.startswith(f"language_model.layers.{last}.") for n in mllm)  # never run: not trained
        lora = names(parts[stages.PART_LORA], unet)
        assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
        assert {n for n in frozen_unet if "lora" in n} == set()
        assert pipe.config.lora_rank == 4


@pytest.mark.parametrize("stage", ["align", "multi"])
def test_every_trainable_parameter_gets_a_gradient_and_no_frozen_one(tiny_model, tmp_path, stage):
    """What distributed data parallel needs (no unused trainable parameter), and the frozen MLLM of
    stage 1 runs without autograd."""
    torch.manual_seed(0)
    pipe = pipeline(tiny_model, tmp_path, stage)
    encoder, unet = pipe.encoder, pipe.base.unet
    parts = stages.trainable_parts(encoder, unet, stage)
    if stage == "multi":  # LoRA B starts at zero, which zeroes the gradient of A: move off the start
        with torch.no_grad():
            for param in parts[stages.PART_LORA]:
                param.add_(0.01 * torch.randn_like(param))
    rng = np.random.default_rng(0)
    for name in ("t.png", "a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    records = parse_records(json.loads(json.dumps(
        [{"image_file": ["a.png", "b.png"], "text": ["x"], "target": "t.png"}])))
    ds = TrainingDataset(records, tmp_path, Augmentations(resolution=64, drop_text=0, drop_references=0,
                                                           drop_both=0), seed=0)
    batch = Collator(encoder.processor)([ds[0]])
    model = loop.TrainingModel(encoder, unet, stages.trains_mllm(stage))
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.base.scheduler.config)
    loss = loop.training_loss(model, pipe, noise_scheduler, batch, torch.Generator().manual_seed(0),
                              torch.device("cpu"), noise_offset=0.1)
    loss.backward()
    for part, group in parts.items():
        missing = [p.shape for p in group if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"{part}: {len(missing)} trainable tensors got no gradient"
    frozen = [p for m in (encoder, unet, pipe.base.vae, pipe.base.text_encoder) for p in m.parameters()
              if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


@pytest.mark.parametrize(("stage", "expected"), [
    ("align", (1e-4, 8, 1)), ("single", (4e-5, 4, 2)), ("multi", (2e-5, 1, 4))])
def test_train_command_defaults_are_the_release_scripts(tmp_path, stage, expected):
    """`easyref train` with no optimization flags runs the release's per-stage settings: its learning rates,
    batches and accumulation, no weight decay, no clipping, at most 28 references (METHOD.md §3)."""
    from easyref.cli import build_parser
    from easyref.training.commands import options_from_args

    args = build_parser().parse_args(["train", "--stage", stage, "--data", str(tmp_path / "d.json"),
                                      "--output", str(tmp_path / "run"), "--model", "m"])
    opts = options_from_args(args).resolved()
    assert (opts.learning_rate, opts.batch_size, opts.gradient_accumulation_steps) == expected
    assert (opts.weight_decay, opts.max_grad_norm, opts.augment.max_references) == (0.0, 0.0, 28)
    python_api = TrainOptions(stage=stage, data=tmp_path / "d.json", output=tmp_path / "run").resolved()
    assert (python_api.weight_decay, python_api.max_grad_norm, python_api.augment.max_references) == (0.0, 0.0, 28)


def test_train_negative_prompt_is_recorded_in_the_adapter_and_inherited(tiny_model, tmp_path):
    """`easyref train --negative-prompt ''` (ShapesWorld's base never saw the release's words) changes the
    adapter's default; without the flag the --init adapter's default carries on."""
    from easyref.config import RELEASE_NEGATIVE_PROMPT

    def load(**extra):
        opts = TrainOptions(stage="multi", data=tmp_path / "d.json", output=tmp_path / "run", model=str(tiny_model),
                            init=tiny_model / "adapter", lora_rank=4, resolution=64,
                            augment=Augmentations(resolution=64), **extra).resolved()
        return loop.load_pipeline(opts)

    assert load().config.negative_prompt == RELEASE_NEGATIVE_PROMPT
    assert load(negative_prompt="").config.negative_prompt == ""


def test_skip_earlier_stages_starts_multi_from_a_new_adapter(tiny_model, tmp_path):
    """The progressive-training ablation: stage multi from a new adapter (fresh reference tokens, a LoRA);
    the flag is refused where it means nothing."""
    from easyref.errors import InvalidArgumentError

    def options(**extra):
        return TrainOptions(stage="multi", data=tmp_path / "d.json", output=tmp_path / "run", model=str(tiny_model),
                            lora_rank=4, resolution=64, augment=Augmentations(resolution=64), **extra).resolved()

    with pytest.raises(InvalidArgumentError, match="pass --init"):
        options().check()
    with pytest.raises(InvalidArgumentError, match="without --init"):
        options(skip_earlier_stages=True, init=tiny_model / "adapter").check()
    opts = options(skip_earlier_stages=True, num_reference_tokens=3, cond_image_size=56)
    opts.check()
    pipe = loop.load_pipeline(opts)
    assert pipe.config.num_reference_tokens == 3 and pipe.config.lora_rank == 4
    trained = loop.load_pipeline(options(init=tiny_model / "adapter"))
    assert not torch.equal(pipe.encoder.final.reference_tokens, trained.encoder.final.reference_tokens[:3])
