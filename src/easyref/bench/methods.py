"""The methods MRBench compares, behind one interface (paper §5, Table 3 and Table 5).

A method turns a benchmark group (references + caption) into images. ``easyref`` is the model
under test; the baselines are the two usual ways of following a group that EasyRef is meant to
beat (METHOD.md §1) and the floor:

* ``ip-adapter``: IP-Adapter-SDXL with the group's per-image CLIP embeddings averaged, as its
  users do for several references (no interaction between the images).
* ``lora``: a LoRA finetuned on each group's references (DreamBooth-style), then sampled: strong
  consistency, but a training run per group; its tuning time is reported separately.
* ``text-only``: the base model with the caption alone.

Every method samples with the same seed handling as ``EasyRefPipeline`` (a CPU generator seeded
per group), so at equal settings the methods start from the same noise and differ only in
their conditioning. Adding a method is one :class:`Method` subclass and one :data:`METHODS` entry.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from easyref import ip_adapter_format
from easyref.bench.manifest import Group
from easyref.devices import pick_device, pick_dtype
from easyref.errors import InvalidArgumentError, ModelFormatError
from easyref.hub import resolve
from easyref.images import load_image
from easyref.pipeline import EasyRefPipeline
from easyref.single_file import config_in_use

# The weight file and sub-folder of IP-Adapter-SDXL in h94/IP-Adapter, diffusers' documented example.
LORA_ADAPTER_NAME = "bench-lora"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Denoising settings shared by every method, so a comparison changes only the conditioning."""

    steps: int = 30
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sampling:
        return cls(steps=args.steps, guidance_scale=args.guidance_scale, height=args.height, width=args.width)


class Method(abc.ABC):
    """One way of generating images for a benchmark group.

    ``settings()`` must be JSON-serialisable and the same in every process of a sharded run (it is
    stored in run.json and every sidecar, and a resumed run must match it), so it holds no device.
    """

    name: ClassVar[str]
    # True when prepare() trains on the group: the runner then reports its time as tuning_seconds.
    tunes: ClassVar[bool] = False

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that changes the pixels besides the group and the seed."""

    def prepare(self, group: Group, seed: int) -> None:  # noqa: B027 - an optional hook, empty by design
        """Per-group work before :meth:`generate` (tuning); the runner times it."""

    @abc.abstractmethod
    def generate(self, group: Group, seed: int, num_images: int) -> list[Image.Image]:
        """``num_images`` images for ``group`` from one seeded call."""


def _sample(pipe: Any, prompt: str, seed: int, num_images: int, sampling: Sampling, **kwargs: Any) -> list[Image.Image]:
    """One call of a plain diffusers SDXL pipeline, seeded the way EasyRefPipeline seeds."""
    result = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed),
                  num_inference_steps=sampling.steps, guidance_scale=sampling.guidance_scale,
                  height=sampling.height, width=sampling.width, num_images_per_prompt=num_images, **kwargs)
    return list(result.images)


def load_plain_sdxl(base: str | Path, device: str | torch.device | None = None,
                    torch_dtype: str | torch.dtype | None = None, base_config: str | Path | None = None):
    """A plain ``StableDiffusionXLPipeline`` (no EasyRef processors) for the baselines; ``base_config``
    configures a single-file ``base`` (:meth:`EasyRefPipeline.load_base`)."""
    target = pick_device(str(device) if device is not None else None)
    pipe = EasyRefPipeline.load_base(base, pick_dtype(torch_dtype, target), base_config).to(target)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_image_processor(encoder: Any):
    """The image processor diffusers builds for an IP-Adapter's CLIP encoder (its image size, CLIP
    normalisation), in its PIL flavour so no torchvision is needed."""
    from transformers import CLIPImageProcessorPil

    size = encoder.config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _load_group_images(group: Group) -> list[Image.Image]:
    return [load_image(path) for path in group.references]


def _dtype_name(pipe: Any) -> str:
    return str(pipe.unet.dtype).removeprefix("torch.")


def _device(args: argparse.Namespace, device: str | torch.device | None) -> str:
    """The device a method loads on: the launch's (one GPU per process) when given, else ``--device``."""
    return str(device) if device is not None else args.device


# -- easyref ---------------------------------------------------------------------------------------

class EasyRefMethod(Method):
    """EasyRef itself; ``aggregation`` overrides the adapter's (paper Table 5: tokens, average, concat)."""

    name = "easyref"

    def __init__(self, pipe: EasyRefPipeline, sampling: Sampling, scale: float = 1.0,
                 aggregation: str | None = None) -> None:
        if aggregation is not None:
            pipe.set_aggregation(aggregation)
        self.pipe = pipe
        self.sampling = sampling
        self.scale = scale

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: str | torch.device | None = None) -> EasyRefMethod:
        if not any((args.model, args.base, args.mllm, args.adapter)):
            raise InvalidArgumentError("the easyref method needs --model DIR (or --base, --mllm and --adapter)")
        pipe = EasyRefPipeline.from_pretrained(args.model, base=args.base, mllm=args.mllm, adapter=args.adapter,
                                               device=_device(args, device), torch_dtype=args.dtype,
                                               mllm_dtype=getattr(args, "mllm_dtype", None),
                                               mllm_quantize=getattr(args, "mllm_quantize", None),
                                               offload=getattr(args, "offload", None), base_config=_base_config(args))
        return cls(pipe, Sampling.from_args(args), scale=args.scale, aggregation=args.aggregation)

    def settings(self) -> dict[str, Any]:
        # Aggregation on its own, not inside the adapter config: reports name runs by the settings
        # that differ, and Table 5's runs differ only there.
        config = self.pipe.config.to_dict()
        return {**self.sampling.settings(), "scale": self.scale, "aggregation": config.pop("aggregation"),
                "adapter_config": config, "sources": self.pipe.sources, "dtype": _dtype_name(self.pipe.base),
                "mllm_quantization": self.pipe.encoder.quantization}

    def generate(self, group: Group, seed: int, num_images: int) -> list[Image.Image]:
        result = self.pipe(list(group.references), group.caption, seed=seed, num_inference_steps=self.sampling.steps,
                           guidance_scale=self.sampling.guidance_scale, scale=self.scale, height=self.sampling.height,
                           width=self.sampling.width, num_images=num_images, progress=False)
        return result.images


# -- baselines on a plain SDXL --------------------------------------------------------------------

def _base_config(args: argparse.Namespace) -> str | None:
    return getattr(args, "base_config", None)


def _base_sources(base: str | Path, args: argparse.Namespace) -> dict[str, str]:
    """The base for a sidecar: its source, plus the configuration a single-file base was loaded with."""
    config = config_in_use(base, _base_config(args))
    return {"base": str(base)} if config is None else {"base": str(base), "base_config": config}


def base_source(args: argparse.Namespace) -> str | Path:
    """The SDXL base for a baseline: ``--base``, or ``base/`` inside ``--model``."""
    if args.base:
        return args.base
    if args.model:
        folder = resolve(args.model, "model") / "base"
        if not folder.is_dir():
            raise ModelFormatError(f"model folder {args.model} has no base/ part (or give --base)")
        return folder
    raise InvalidArgumentError("the baselines need the SDXL base model: give --base (or --model with a base/ folder)")


class TextOnlyMethod(Method):
    """The base model with the caption only: what the references add is measured against this."""

    name = "text-only"

    def __init__(self, pipe: Any, sampling: Sampling, sources: dict[str, str]) -> None:
        self.pipe = pipe
        self.sampling = sampling
        self.sources = sources

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: str | torch.device | None = None) -> TextOnlyMethod:
        base = base_source(args)
        return cls(load_plain_sdxl(base, _device(args, device), args.dtype, _base_config(args)),
                   Sampling.from_args(args), _base_sources(base, args))

    def settings(self) -> dict[str, Any]:
        return {**self.sampling.settings(), "sources": self.sources, "dtype": _dtype_name(self.pipe)}

    def generate(self, group: Group, seed: int, num_images: int) -> list[Image.Image]:
        return _sample(self.pipe, group.caption, seed, num_images, self.sampling)


class IPAdapterMethod(Method):
    """IP-Adapter-SDXL with the group's per-image embeddings averaged into one.

    That is how its users feed several references (METHOD.md §1): each image is encoded alone, so
    nothing tells the model which parts the images share. The unconditional branch is diffusers'
    own (zeros for the plain adapter), averaged the same way.
    """

    name = "ip-adapter"

    def __init__(self, pipe: Any, sampling: Sampling, scale: float, sources: dict[str, str]) -> None:
        if getattr(pipe.unet, "encoder_hid_proj", None) is None or getattr(pipe, "image_encoder", None) is None:
            raise ModelFormatError("the ip-adapter method needs a pipeline with an IP-Adapter and image encoder loaded")
        pipe.set_ip_adapter_scale(scale)
        self.pipe = pipe
        self.sampling = sampling
        self.scale = scale
        self.sources = sources

    @staticmethod
    def load(base: str | Path, ip_adapter: str | Path, *, subfolder: str = "",
             weight_name: str = ip_adapter_format.WEIGHT_NAME, image_encoder: str | Path | None = None,
             device: str | torch.device | None = None, torch_dtype: str | torch.dtype | None = None,
             base_config: str | Path | None = None):
        """A plain SDXL with an IP-Adapter loaded through diffusers' ``load_ip_adapter``.

        ``ip_adapter`` is a folder or hub id holding ``subfolder/weight_name``, or the weight file
        itself. The CLIP image encoder defaults to ``image_encoder/`` beside the weights (diffusers'
        own default); ``image_encoder`` overrides it with a folder or hub id. The image processor is
        built as diffusers builds it (the encoder's image size, CLIP normalisation), in its PIL
        flavour so no torchvision is needed.
        """
        from transformers import CLIPVisionModelWithProjection

        source = Path(ip_adapter)
        if source.is_file():
            source, subfolder, weight_name = source.parent, "", source.name
        pipe = load_plain_sdxl(base, device, torch_dtype, base_config)
        if image_encoder is not None:
            encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder, dtype=pipe.unet.dtype)
        else:
            folder = Path(subfolder, ip_adapter_format.IMAGE_ENCODER_FOLDER).as_posix()
            encoder = CLIPVisionModelWithProjection.from_pretrained(str(source), subfolder=folder,
                                                                    dtype=pipe.unet.dtype)
        pipe.register_modules(image_encoder=encoder.to(pipe.device), feature_extractor=clip_image_processor(encoder))
        pipe.load_ip_adapter(str(source), subfolder=subfolder, weight_name=weight_name, image_encoder_folder=None)
        return pipe

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: str | torch.device | None = None) -> IPAdapterMethod:
        if not args.ip_adapter:
            raise InvalidArgumentError("the ip-adapter method needs --ip-adapter (a folder, hub id or weight file)")
        base = base_source(args)
        pipe = cls.load(base, args.ip_adapter, subfolder=args.ip_adapter_subfolder,
                        weight_name=args.ip_adapter_weight_name, image_encoder=args.image_encoder,
                        device=_device(args, device), torch_dtype=args.dtype, base_config=_base_config(args))
        sources = {**_base_sources(base, args), "ip_adapter": str(args.ip_adapter),
                   "subfolder": args.ip_adapter_subfolder, "weight_name": args.ip_adapter_weight_name,
                   "image_encoder": str(args.image_encoder or "")}
        return cls(pipe, Sampling.from_args(args), args.scale, sources)

    def settings(self) -> dict[str, Any]:
        return {**self.sampling.settings(), "scale": self.scale, "aggregation": "average", "sources": self.sources,
                "dtype": _dtype_name(self.pipe)}

    @torch.no_grad()
    def group_embeds(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """``ip_adapter_image_embeds`` for a group: per-image embeddings averaged over the group.

        Shape ``[(2 or 1, 1, ...)]`` in diffusers' layout (unconditional half first with guidance).
        """
        from diffusers.models.embeddings import ImageProjection

        projection = self.pipe.unet.encoder_hid_proj.image_projection_layers[0]
        hidden_states = not isinstance(projection, ImageProjection)  # the "plus" adapters read hidden states
        cond, uncond = self.pipe.encode_image(list(images), self.pipe.device, 1, hidden_states)
        cond, uncond = cond.mean(0, keepdim=True), uncond.mean(0, keepdim=True)
        if self.sampling.guidance_scale <= 1:
            return [cond.unsqueeze(1)]
        return [torch.cat([uncond, cond]).unsqueeze(1)]

    def generate(self, group: Group, seed: int, num_images: int) -> list[Image.Image]:
        embeds = self.group_embeds(_load_group_images(group))
        return _sample(self.pipe, group.caption, seed, num_images, self.sampling, ip_adapter_image_embeds=embeds)


# -- lora ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoRATuning:
    """Per-group LoRA finetuning, DreamBooth-style; defaults follow diffusers' DreamBooth-LoRA-SDXL."""

    steps: int = 500
    rank: int = 4
    learning_rate: float = 1e-4
    resolution: int = 1024

    def check(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InvalidArgumentError(f"lora steps must be a positive integer, got {self.steps}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidArgumentError(f"lora rank must be a positive integer, got {self.rank}")
        if not math.isfinite(self.learning_rate) or self.learning_rate < 0:
            raise InvalidArgumentError(f"lora learning rate must be a finite number >= 0, got {self.learning_rate}")
        if self.resolution % 8 or not 64 <= self.resolution <= 4096:
            raise InvalidArgumentError(
                f"lora resolution must be a multiple of 8 from 64 to 4096, got {self.resolution}")


def crop_square(image: Image.Image, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize the short side to ``size`` and centre-crop; pixels in [-1, 1] and the crop's (top, left)."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    pixels = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0, (top, left)


class LoRAMethod(Method):
    """The tuning-based baseline: a LoRA trained on each group's references with its caption, then sampled.

    ``prepare`` removes the previous group's LoRA, adds a fresh one (initialised from the group's
    seed) and trains it: plain noise-prediction MSE on VAE latents of the references, SDXL text
    embeddings of the caption and SDXL size/crop ids, AdamW on the LoRA weights only (kept in
    float32 whatever the pipeline dtype). Groups therefore never leak into each other and a
    group's images depend only on its references, caption and seed.
    """

    name = "lora"
    tunes = True

    def __init__(self, pipe: Any, sampling: Sampling, tuning: LoRATuning, sources: dict[str, str]) -> None:
        tuning.check()
        self.pipe = pipe
        self.sampling = sampling
        self.tuning = tuning
        self.sources = sources
        self._tuned_for: str | None = None
        pipe.unet.requires_grad_(False)

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: str | torch.device | None = None) -> LoRAMethod:
        base = base_source(args)
        tuning = LoRATuning(steps=args.lora_steps, rank=args.lora_rank, learning_rate=args.lora_lr,
                            resolution=args.lora_resolution)
        tuning.check()
        return cls(load_plain_sdxl(base, _device(args, device), args.dtype, _base_config(args)),
                   Sampling.from_args(args), tuning, _base_sources(base, args))

    def settings(self) -> dict[str, Any]:
        return {**self.sampling.settings(), "lora": dataclasses.asdict(self.tuning), "sources": self.sources,
                "dtype": _dtype_name(self.pipe)}

    def _reset(self, seed: int) -> list[torch.nn.Parameter]:
        """Drop any previous LoRA and add a fresh one, its random init drawn from ``seed``."""
        from peft import LoraConfig

        unet = self.pipe.unet
        if LORA_ADAPTER_NAME in getattr(unet, "peft_config", {}):
            unet.delete_adapters(LORA_ADAPTER_NAME)
        self._tuned_for = None
        config = LoraConfig(r=self.tuning.rank, lora_alpha=self.tuning.rank, target_modules=LORA_TARGETS,
                            init_lora_weights=True)
        devices = [unet.device] if unet.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            unet.add_adapter(config, adapter_name=LORA_ADAPTER_NAME)
        params = [param for name, param in unet.named_parameters() if LORA_ADAPTER_NAME in name]
        for param in params:
            param.data = param.data.float()
            param.requires_grad_(True)
        return params

    @torch.no_grad()
    def _training_inputs(self, group: Group, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Latents, size/crop ids of every reference, and the caption's text embeddings (computed once)."""
        pipe, size = self.pipe, self.tuning.resolution
        pixels, time_ids = [], []
        for image in _load_group_images(group):
            tensor, (top, left) = crop_square(image, size)
            pixels.append(tensor)
            time_ids.append([image.height, image.width, top, left, size, size])
        vae = pipe.vae
        # SDXL's VAE overflows in float16; diffusers' pipelines upcast it for the same reason.
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        vae_dtype = torch.float32 if upcast else vae.dtype
        if upcast:
            vae.to(torch.float32)
        try:
            latents = torch.cat([
                vae.encode(p.unsqueeze(0).to(pipe.device, vae_dtype)).latent_dist.sample(generator)
                for p in pixels
            ]) * vae.config.scaling_factor
        finally:
            if upcast:
                vae.to(torch.float16)
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(group.caption, device=pipe.device, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=False)
        return latents, torch.tensor(time_ids, dtype=torch.float32), prompt_embeds, pooled

    def prepare(self, group: Group, seed: int) -> None:
        from diffusers import DDPMScheduler

        pipe, unet = self.pipe, self.pipe.unet
        params = self._reset(seed)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents, time_ids, prompt_embeds, pooled = self._training_inputs(group, generator)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        optimizer = torch.optim.AdamW(params, lr=self.tuning.learning_rate)
        dtype, device = unet.dtype, unet.device
        num_timesteps = noise_scheduler.config.num_train_timesteps
        for step in range(self.tuning.steps):
            index = step % len(latents)  # one reference per step, cycling through the group
            clean = latents[index:index + 1].float()
            noise = torch.randn(clean.shape, generator=generator).to(device)
            timestep = torch.randint(0, num_timesteps, (1,), generator=generator).to(device)
            noisy = noise_scheduler.add_noise(clean, noise, timestep)
            prediction = unet(noisy.to(dtype), timestep, encoder_hidden_states=prompt_embeds,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids[index:index + 1]
                                                 .to(device, dtype)}).sample
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(clean, noise, timestep)
            else:
                target = noise
            loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self._tuned_for = group.id

    def generate(self, group: Group, seed: int, num_images: int) -> list[Image.Image]:
        if self._tuned_for != group.id:
            raise RuntimeError(f"the lora method must be prepared (tuned) on group {group.id} before generating")
        return _sample(self.pipe, group.caption, seed, num_images, self.sampling)


# -- registry --------------------------------------------------------------------------------------

MethodFactory = Callable[[argparse.Namespace, str | torch.device | None], Method]

METHODS: dict[str, MethodFactory] = {
    EasyRefMethod.name: EasyRefMethod.from_args,
    IPAdapterMethod.name: IPAdapterMethod.from_args,
    LoRAMethod.name: LoRAMethod.from_args,
    TextOnlyMethod.name: TextOnlyMethod.from_args,
}


def make_method(name: str, args: argparse.Namespace, device: str | torch.device | None = None) -> Method:
    """Build a method from command-line options; ``device`` overrides ``args.device`` (a sharded run's GPU)."""
    if name not in METHODS:
        raise InvalidArgumentError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](args, device)
