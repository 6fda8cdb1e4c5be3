"""The training loop: one accelerate loop from a single CPU process to multi-node GPUs.

Reads top to bottom as the algorithm, per optimizer step:

1. VAE latents of the target crops (frozen, no grad, float32), noise (plus an optional noise
   offset), random timesteps, noisy latents; SDXL text embeddings of the captions (frozen).
2. The trainable model (:class:`TrainingModel`: reference encoder + UNet as one module, so DDP,
   DeepSpeed or FSDP wrap one model) encodes each sample's references and caption into
   reference tokens and predicts the noise with them as ``image_embeds``.
3. Loss = MSE against the noise (or velocity), backward, accumulate, clip, step.

Process management is accelerate's: ``easyref train ...`` is one process, ``accelerate launch
[--config_file configs/...] -m easyref train ...`` the same command on many. Randomness never
depends on global state: the data come from :class:`~easyref.training.data.EpochSampler` and
per-sample generators, the noise from a generator seeded by (seed, process, micro-batch), so
``--resume`` continues exactly where the checkpoint left off (accelerate restores the weights,
optimizer, scheduler and RNG states; the step gives the data position).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from easyref import adapter as unet_adapter
from easyref.errors import InvalidArgumentError, ModelFormatError, ShapeMismatchError
from easyref.files import atomic_folder, folder_lock
from easyref.hub import resolve
from easyref.pipeline import EasyRefPipeline
from easyref.training import checkpoints, stages
from easyref.training.data import Collator, EpochSampler, TrainingDataset, validation_example
from easyref.training.errors import RunMismatchError, TrainingDataError
from easyref.training.monitor import VALIDATION_FOLDER, Monitor, save_grid
from easyref.training.options import DEFAULT_LORA_RANK, TrainOptions
from easyref.training.records import count_kinds, load_records
from easyref.weights import mllm_state_dict, save_adapter


class TrainingModel(nn.Module):
    """Every module with trainable parameters, wrapped as one model by DDP / DeepSpeed / FSDP.

    ``forward`` returns the UNet's prediction for noisy latents conditioned on the captions'
    SDXL embeddings and on the reference tokens of each sample's group. When the stage keeps
    the MLLM frozen, the backbone runs without autograd (only the final-layer copy and the
    projection need gradients).
    """

    def __init__(self, encoder: nn.Module, unet: nn.Module, train_mllm: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.unet = unet
        self.train_mllm = train_mllm

    def reference_tokens(self, mllm: dict[str, Any]) -> torch.Tensor | list[torch.Tensor]:
        """Each sample's conditioning tokens, as the adapter's aggregation computes them at inference."""
        encoder = self.encoder
        with torch.set_grad_enabled(self.train_mllm and torch.is_grad_enabled()):
            prefix = encoder.backbone(mllm["input_ids"], mllm["attention_mask"], mllm["pixel_values"],
                                      mllm["image_grid_thw"])
        return encoder.aggregate(prefix.to(encoder.dtype), mllm["input_ids"], mllm["attention_mask"],
                                 mllm.get("group_sizes"))

    def _predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                 pooled_embeds: torch.Tensor, time_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.conv_in.weight.dtype  # frozen UNet weights may be in half precision
        added = {"text_embeds": pooled_embeds.to(dtype), "time_ids": time_ids.to(dtype),
                 "image_embeds": [tokens.to(dtype).unsqueeze(1)]}
        return self.unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype),
                         added_cond_kwargs=added, return_dict=False)[0]

    def forward(self, mllm: dict[str, Any], noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                prompt_embeds: torch.Tensor, pooled_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        tokens = self.reference_tokens(mllm)
        if isinstance(tokens, list):  # concat: token counts differ between samples, so one UNet call each
            return torch.cat([self._predict(noisy_latents[i:i + 1], timesteps[i:i + 1], prompt_embeds[i:i + 1],
                                            pooled_embeds[i:i + 1], time_ids[i:i + 1], t)
                              for i, t in enumerate(tokens)])
        return self._predict(noisy_latents, timesteps, prompt_embeds, pooled_embeds, time_ids, tokens)


# -- building the model ---------------------------------------------------------------------------

def model_parts(opts: TrainOptions) -> tuple[str | Path, str | Path]:
    """(base, mllm) sources: ``--base`` / ``--mllm`` or the parts of ``--model``."""
    base, mllm = opts.base, opts.mllm
    if opts.model is not None:
        folder = resolve(opts.model, "model")
        for part in ("base", "mllm"):
            if (base, mllm)[part == "mllm"] is None and not (folder / part).is_dir():
                raise ModelFormatError(f"model folder {opts.model} has no {part}/ (or give --{part})")
        base = base if base is not None else folder / "base"
        mllm = mllm if mllm is not None else folder / "mllm"
    return base, mllm


def load_pipeline(opts: TrainOptions) -> EasyRefPipeline:
    """A new EasyRef (stage 1, or ``--skip-earlier-stages``) or the ``--init`` adapter, plus the stage's LoRA,
    in float32."""
    base, mllm = model_parts(opts)
    if opts.init is None:
        pipe = EasyRefPipeline.create(base, mllm, torch_dtype=torch.float32, base_config=opts.base_config,
                                      **opts.fresh_adapter_kwargs())
    else:
        pipe = EasyRefPipeline.from_pretrained(base=base, mllm=mllm, adapter=opts.init, device="cpu",
                                               torch_dtype="float32", base_config=opts.base_config)
    if stages.trains_mllm(opts.stage):
        current = pipe.config.lora_rank
        if current is not None and opts.lora_rank is not None and opts.lora_rank != current:
            raise ShapeMismatchError(f"--lora-rank {opts.lora_rank} does not match the LoRA rank {current} of "
                                     f"the --init adapter {opts.init}")
        rank = current or opts.lora_rank or DEFAULT_LORA_RANK
        unet_adapter.add_lora(pipe.base.unet, rank)
        pipe.set_config(lora_rank=rank)
    if opts.aggregation is not None and opts.aggregation != pipe.config.aggregation:
        # The three aggregations use the same parameters; only how they are combined differs.
        pipe.set_aggregation(opts.aggregation)
    if opts.negative_prompt is not None:
        pipe.set_config(negative_prompt=opts.negative_prompt)
    return pipe


def enable_layer_checkpointing(module: nn.Module) -> int:
    """Gradient checkpointing for every transformers decoder / vision block inside ``module``.

    The encoder calls its layers directly, so the flag is set on the layers themselves (the
    protocol of transformers' ``GradientCheckpointingLayer``); returns how many were switched.
    """
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    return len(layers)


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen floating-point weights in ``dtype`` (trainable ones stay float32 for the optimizer)."""
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)


# -- one step ---------------------------------------------------------------------------------------

def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process and on every run."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def training_loss(model: nn.Module, pipe: EasyRefPipeline, noise_scheduler, batch: dict[str, Any],
                  generator: torch.Generator, device: torch.device, noise_offset: float) -> torch.Tensor:
    """Noise-prediction MSE for one micro-batch (random numbers drawn on the CPU from ``generator``)."""
    base = pipe.base
    with torch.no_grad():
        pixels = batch["pixels"].to(device, torch.float32)
        dist = base.vae.encode(pixels).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(device)
        latents = (dist.mean + dist.std * eps) * base.vae.config.scaling_factor
        size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((size, latents.shape[1], 1, 1), generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (size,), generator=generator)
        timesteps = timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prompt_embeds, _, pooled, _ = base.encode_prompt(batch["captions"], device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
    mllm = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch["mllm"].items()}
    prediction = model(mllm, noisy, timesteps, prompt_embeds, pooled, batch["time_ids"].to(device))
    return F.mse_loss(prediction.float(), target.float())


# -- checkpoints ------------------------------------------------------------------------------------

def checkpoint_kwargs(accelerator) -> tuple[dict, dict]:
    """(save_state kwargs, load_state kwargs) that keep frozen weights out of checkpoints.

    The frozen base UNet and MLLM are reloaded from the model folder on resume, so a checkpoint
    holds the trainable weights only: DeepSpeed's own option, else a save hook that filters
    accelerate's state dict. FSDP checkpoints keep accelerate's default (sharded) format.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"exclude_frozen_parameters": True}, {"load_module_strict": False}
    if accelerator.distributed_type == DistributedType.FSDP:
        return {}, {}
    def keep_trainable(models, weights, output_dir) -> None:
        for module, state in zip(models, weights, strict=True):  # accelerate hands over unwrapped models
            trainable = {name for name, param in module.named_parameters() if param.requires_grad}
            for key in [key for key in state if key not in trainable]:
                del state[key]

    accelerator.register_save_state_pre_hook(keep_trainable)
    return {}, {"strict": False}


def check_checkpoint_fits(checkpoint: Path, model: nn.Module) -> None:
    """Every trainable weight must be in the checkpoint with the same shape (else: a different run)."""
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        return  # DeepSpeed / FSDP formats: their loaders check
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}  # unwrapped
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise RunMismatchError(f"checkpoint {checkpoint} lacks {len(missing)} trainable weights of this run, "
                               f"e.g. {missing[0]}; it belongs to another stage or model")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ShapeMismatchError(f"checkpoint {checkpoint}: {name} has shape {shapes[name]} but this run "
                                     f"needs {shape}")


def _load_checkpoint(checkpoint: Path, accelerator: Any, model: nn.Module, load_kwargs: dict) -> dict[str, Any]:
    """Load a checkpoint into the prepared model; its training state is returned.

    A checkpoint of another run is refused as such; one that is damaged (a file truncated or missing
    after a crash or a full disk) is named with the earlier checkpoint to resume from instead.
    """
    try:
        state = checkpoints.read_state(checkpoint)
        if not isinstance(state, dict) or not {"step", "counts", "batches_per_epoch"} <= state.keys():
            raise ValueError(f"{checkpoints.STATE_FILE} lacks step, counts or batches_per_epoch")
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the same damage for the user
        raise RunMismatchError(checkpoints.broken(checkpoint, exc)) from None
    try:
        check_checkpoint_fits(checkpoint, accelerator.unwrap_model(model))
        accelerator.load_state(str(checkpoint), **load_kwargs)
    except (RunMismatchError, ShapeMismatchError):  # another run's checkpoint, said as such
        raise
    except Exception as exc:  # noqa: BLE001
        raise RunMismatchError(checkpoints.broken(checkpoint, exc)) from None
    return state


# -- the run ------------------------------------------------------------------------------------------

def _banner(opts: TrainOptions, accelerator, records, parts, frozen, batches_per_epoch: int) -> list[str]:
    kinds = ", ".join(f"{count} {kind}" for kind, count in count_kinds(records).items() if count)
    per_step = opts.batch_size * opts.gradient_accumulation_steps * accelerator.num_processes
    lines = [
        f"{stages.STAGE_TITLES[opts.stage]}: {accelerator.num_processes} process(es) on "
        f"{accelerator.device.type} ({accelerator.distributed_type.value.lower().replace('no', 'single process')}), "
        f"mixed precision {accelerator.mixed_precision}",
        f"data: {len(records)} records ({kinds}); {per_step} samples per step "
        f"({opts.batch_size} per process x {opts.gradient_accumulation_steps} accumulated x "
        f"{accelerator.num_processes} processes); {batches_per_epoch} batches per process per epoch",
        "trainable parameters:",
        *(f"  {part:<36} {count:>14,}" for part, count in stages.trainable_counts(parts).items()),
        f"  {'total':<36} {sum(stages.trainable_counts(parts).values()):>14,}",
        "frozen parameters:",
        *(f"  {part:<36} {count:>14,}" for part, count in frozen.items()),
    ]
    return lines


def _validation_examples(opts: TrainOptions, records, monitor: Monitor) -> list:
    examples = []
    for record in records:
        if len(examples) == opts.validation_records:
            break
        try:
            examples.append(validation_example(record, opts.image_root, opts.resolution,
                                               opts.augment.max_references, opts.allow_absolute_paths))
        except (OSError, ValueError) as exc:
            monitor.say(f"validation: skipping record {record.index} ({exc})")
    return examples


def _export_adapter(opts: TrainOptions, accelerator, model: nn.Module, pipe: EasyRefPipeline,
                    train_mllm: bool) -> Path:
    """Write OUTPUT/adapter (config, EasyRef weights, and the MLLM for stages 2 and 3) atomically."""
    from accelerate.utils import DistributedType

    final = opts.output / checkpoints.ADAPTER_FOLDER
    if accelerator.distributed_type == DistributedType.FSDP:
        # Sharded weights: gather a full state dict, load it into an unsharded copy on the main process.
        state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            copy = load_pipeline(opts)
            TrainingModel(copy.encoder, copy.base.unet, train_mllm).load_state_dict(state, strict=False)
            encoder, unet, config = copy.encoder, copy.base.unet, copy.config
    elif accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        encoder, unet, config = unwrapped.encoder, unwrapped.unet, pipe.config
    if accelerator.is_main_process:
        with atomic_folder(final) as staging:
            save_adapter(staging, config, encoder, unet, mllm_state=mllm_state_dict(encoder) if train_mllm else None)
    accelerator.wait_for_everyone()
    return final


def train(opts: TrainOptions) -> Path:
    """Run (or resume) one stage; return the final adapter folder."""
    opts = opts.resolved()
    opts.check()
    records = load_records(opts.data)  # format errors surface before anything heavy
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=opts.mixed_precision,
                              gradient_accumulation_steps=opts.gradient_accumulation_steps,
                              step_scheduler_with_optimizer=False)
    if accelerator.gradient_accumulation_steps != opts.gradient_accumulation_steps:
        raise InvalidArgumentError(
            f"the accelerate config sets gradient accumulation to {accelerator.gradient_accumulation_steps} but "
            f"--gradient-accumulation-steps is {opts.gradient_accumulation_steps}: remove one of the two")
    num_processes = accelerator.num_processes
    if len(records) < opts.batch_size * num_processes:
        raise TrainingDataError(f"{opts.data} has {len(records)} records; one step needs at least "
                                f"{opts.batch_size * num_processes} (--batch-size x processes)")
    identity = {**opts.identity(), "mixed_precision": accelerator.mixed_precision, "num_processes": num_processes}
    checkpoints.check_output(opts.output, identity, opts.resume)
    # One run per output folder; the other processes of this launch share their main process's lock.
    with contextlib.ExitStack() as held:
        if accelerator.is_main_process:
            held.enter_context(folder_lock(opts.output, f"easyref train --stage {opts.stage}"))
        return _train_locked(opts, accelerator, records, identity)


def _train_locked(opts: TrainOptions, accelerator: Any, records: list, identity: dict[str, Any]) -> Path:
    from accelerate.utils import DistributedType, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    main, num_processes, device = accelerator.is_main_process, accelerator.num_processes, accelerator.device
    resume_from = checkpoints.resolve_resume(opts.output, opts.resume)
    accelerator.wait_for_everyone()
    if main:
        checkpoints.remove_partial(opts.output, opts.keep_checkpoints)
        checkpoints.write_run_file(opts.output, identity)
    accelerator.wait_for_everyone()

    # -- model ------------------------------------------------------------------------------------
    set_seed(opts.seed)
    pipe = load_pipeline(opts)
    encoder, base, unet = pipe.encoder, pipe.base, pipe.base.unet
    train_mllm = stages.trains_mllm(opts.stage)
    parts = stages.trainable_parts(encoder, unet, opts.stage)
    for frozen_module in (base.vae, base.text_encoder, base.text_encoder_2):
        frozen_module.requires_grad_(False).eval()
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    # Frozen weights go to half precision only where autocast runs (not fp16 on CPU, say).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    weight_dtype = weight_dtype if accelerator.native_amp else torch.float32
    base.vae.to(device, torch.float32)  # SDXL's VAE overflows in fp16; latents are made in float32
    base.text_encoder.to(device, weight_dtype)
    base.text_encoder_2.to(device, weight_dtype)
    if not sharded and weight_dtype != torch.float32:
        cast_frozen(unet, weight_dtype)
        if not train_mllm:
            cast_frozen(encoder.mllm, weight_dtype)
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        enable_layer_checkpointing(encoder.final)
        if train_mllm:
            enable_layer_checkpointing(encoder.mllm)
    frozen = stages.frozen_counts({"MLLM": encoder.mllm, "UNet": unet, "text encoders": nn.ModuleList(
        [base.text_encoder, base.text_encoder_2]), "VAE": base.vae})
    model = TrainingModel(encoder, unet, train_mllm)
    model.train()
    if not train_mllm:
        encoder.mllm.eval()
    params = [param for group in parts.values() for param in group]
    optimizer = torch.optim.AdamW(params, lr=opts.learning_rate, weight_decay=opts.weight_decay)
    lr_scheduler = get_scheduler(opts.lr_scheduler, optimizer, num_warmup_steps=opts.lr_warmup_steps,
                                 num_training_steps=opts.max_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = opts.batch_size
        ds_config["gradient_clipping"] = opts.max_grad_norm
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    save_kwargs, load_kwargs = checkpoint_kwargs(accelerator)
    params = [param for param in model.parameters() if param.requires_grad]  # FSDP2 swaps parameters in prepare
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)

    # -- data -------------------------------------------------------------------------------------
    dataset = TrainingDataset(records, opts.image_root, opts.augment, opts.seed, opts.allow_absolute_paths)
    sampler = EpochSampler(len(dataset), num_processes, accelerator.process_index, opts.seed)
    loader = DataLoader(dataset, batch_size=opts.batch_size, sampler=sampler, collate_fn=Collator(encoder.processor),
                        num_workers=opts.num_workers, drop_last=True, pin_memory=device.type == "cuda")
    batches_per_epoch = len(loader)

    # -- resume -----------------------------------------------------------------------------------
    start_step, counts = 0, {"skipped_records": 0, "dropped_references": 0}
    if resume_from is not None:
        state = _load_checkpoint(resume_from, accelerator, model, load_kwargs)
        if state["batches_per_epoch"] != batches_per_epoch:
            raise RunMismatchError(f"checkpoint {resume_from} was written with {state['batches_per_epoch']} batches "
                                   f"per epoch, this run has {batches_per_epoch}: the data file changed")
        start_step, counts = state["step"], state["counts"]

    monitor = Monitor(opts.output, opts.max_steps, start_step, enabled=main, progress=opts.progress)
    for line in _banner(opts, accelerator, records, parts, frozen, batches_per_epoch):
        monitor.say(line)
    if resume_from is not None:
        monitor.say(f"resumed from {resume_from} at step {start_step}")
    elif opts.resume is not None:
        monitor.say(f"no checkpoint in {opts.output} yet: starting at step 0")
    examples = _validation_examples(opts, records, monitor) if opts.validation_steps and main else []
    if opts.validation_steps and accelerator.distributed_type == DistributedType.FSDP:
        monitor.say("validation images are skipped under FSDP (the weights are sharded)")

    # -- loop ---------------------------------------------------------------------------------------
    monitor.start()
    gas = opts.gradient_accumulation_steps
    samples_per_step = opts.batch_size * gas * num_processes
    step, micro = start_step, start_step * gas
    epoch, offset = divmod(micro, batches_per_epoch)
    local = torch.zeros(4, dtype=torch.float64)  # loss sum, micro-batches, skipped records, dropped references
    totals = torch.zeros(2, dtype=torch.float64)  # skipped records, dropped references since start (this process)
    window_start, window_steps = time.perf_counter(), 0

    def global_counts() -> dict[str, int]:
        summed = accelerator.reduce(totals.to(device), reduction="sum").cpu()
        return {"skipped_records": counts["skipped_records"] + int(summed[0]),
                "dropped_references": counts["dropped_references"] + int(summed[1])}

    def save_checkpoint() -> None:
        temp = checkpoints.temp_checkpoint(opts.output, step)
        if main and temp.exists():
            shutil.rmtree(temp)
        state = {"step": step, "epoch": micro // batches_per_epoch, "batch_in_epoch": micro % batches_per_epoch,
                 "micro_batches": micro, "batches_per_epoch": batches_per_epoch,
                 "samples_seen": step * samples_per_step, "counts": global_counts()}
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temp), **save_kwargs)
        accelerator.wait_for_everyone()
        if main:
            checkpoints.publish_checkpoint(opts.output, step, state, opts.keep_checkpoints)
        accelerator.wait_for_everyone()

    def validate() -> None:
        if main and examples and accelerator.distributed_type != DistributedType.FSDP:
            model.eval()
            seeds = [opts.seed + i for i in range(opts.validation_seeds)]
            rows = []
            with torch.no_grad(), accelerator.autocast():
                pipe.clear_cache()
                for references, caption, target in examples:
                    row = [target]
                    for seed in seeds:
                        row += pipe(references, caption, seed=seed, num_inference_steps=opts.validation_inference_steps,
                                    guidance_scale=opts.validation_guidance_scale, height=opts.resolution,
                                    width=opts.resolution, progress=False).images
                    rows.append(row)
                pipe.clear_cache()
            path = save_grid(rows, opts.output / VALIDATION_FOLDER / f"step-{step:06d}.png",
                             cell=min(opts.resolution, 256))
            monitor.image("validation", path, step)
            model.train()
            if not train_mllm:
                encoder.mllm.eval()
        accelerator.wait_for_everyone()

    while step < opts.max_steps:
        sampler.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, offset) if offset else loader
        for batch in batches:
            generator = torch.Generator().manual_seed(derive_seed(opts.seed, accelerator.process_index, micro))
            with accelerator.accumulate(model):
                loss = training_loss(model, pipe, noise_scheduler, batch, generator, device, opts.noise_offset)
                accelerator.backward(loss)
                if accelerator.sync_gradients and opts.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, opts.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            local += torch.tensor([float(loss.detach()), 1.0, batch["skipped"], batch["dropped_references"]],
                                  dtype=torch.float64)
            totals += torch.tensor([batch["skipped"], batch["dropped_references"]], dtype=torch.float64)
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            step += 1
            window_steps += 1
            if step % opts.log_steps == 0 or step == opts.max_steps:
                summed = accelerator.reduce(local.to(device), reduction="sum").cpu()
                elapsed = time.perf_counter() - window_start
                monitor.log({
                    "step": step, "loss": float(summed[0] / summed[1]), "lr": lr_scheduler.get_last_lr()[0],
                    "samples_per_s": samples_per_step * window_steps / elapsed,
                    "eta_s": round(elapsed / window_steps * (opts.max_steps - step), 1),
                    "epoch": micro // batches_per_epoch, **global_counts(),
                })
                local.zero_()
                window_start, window_steps = time.perf_counter(), 0
            monitor.advance()
            if step % opts.save_steps == 0 or step == opts.max_steps:
                save_checkpoint()
            if opts.validation_steps and step % opts.validation_steps == 0:
                validate()
            if opts.pause_after_steps == step:
                accelerator.wait_for_everyone()
                monitor.say(f"paused after step {step} (--pause-after-steps): waiting to be stopped")
                while True:
                    time.sleep(3600)
            if step >= opts.max_steps:
                break
        epoch, offset = epoch + 1, 0

    final_counts = global_counts()
    accelerator.wait_for_everyone()
    adapter = _export_adapter(opts, accelerator, model, pipe, train_mllm)
    monitor.say(f"done: {step} steps; {final_counts['skipped_records']} record loads skipped, "
                f"{final_counts['dropped_references']} unreadable references dropped")
    monitor.close()
    if main:
        print(f"wrote {adapter}", flush=True)
    accelerator.wait_for_everyone()  # every process leaves the process group together
    accelerator.end_training()
    return adapter
