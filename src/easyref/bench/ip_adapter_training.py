"""Train the IP-Adapter baseline on image-caption pairs, with diffusers' own IP-Adapter.

The paper compares EasyRef with IP-Adapter-SDXL; on a new base model (ShapesWorld's, or a user's
finetune) no released IP-Adapter exists, so this trains one the way IP-Adapter was trained: the
target image is its own reference, its CLIP image embedding is projected to 4 tokens and enters a
decoupled cross-attention; only the projection and the new ``to_k_ip`` / ``to_v_ip`` learn; text,
image and both are dropped 5% each (a dropped image is a zero embedding, which is what diffusers
feeds the unconditional branch). The adapter is built and run by diffusers (``load_ip_adapter``,
``IPAdapterAttnProcessor2_0``, ``ImageProjection``) and saved in the original weight layout, so
the result loads with the exact code the ``ip-adapter`` benchmark method and users run.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from easyref import ip_adapter_format
from easyref.bench.methods import clip_image_processor, crop_square, load_plain_sdxl
from easyref.errors import InvalidArgumentError
from easyref.files import atomic_folder
from easyref.images import load_image
from easyref.training.records import load_records
from easyref.training.steps import LoopSettings, step_generator, step_rng, train

DROP = 0.05  # text, image and both: IP-Adapter's training recipe


@dataclasses.dataclass(frozen=True)
class IPAdapterTraining:
    """Steps, batch and rate of the baseline's training (IP-Adapter's paper: lr 1e-4, weight decay 0.01)."""

    steps: int = 2000
    batch_size: int = 8
    learning_rate: float = 1e-4
    resolution: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.resolution % 8 or not 64 <= self.resolution <= 4096:
            raise InvalidArgumentError(f"resolution must be a multiple of 8 from 64 to 4096, got {self.resolution}")


def _pairs(data: Path, image_root: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """(image, captions) of every record whose reference is its target (the release's stage-1 records)."""
    pairs = [(image_root / r.target, r.captions) for r in load_records(data) if r.kind == "single"]
    if not pairs:
        raise InvalidArgumentError(f"{data} holds no image-caption pairs (records whose image_file is [target])")
    return pairs


def train_ip_adapter(base: str | Path, image_encoder: str | Path, data: str | Path, output: str | Path,
                     settings: IPAdapterTraining | None = None, *, image_root: str | Path | None = None,
                     progress: bool = True, base_config: str | Path | None = None) -> Path:
    """Train an IP-Adapter for ``base`` on the pairs in ``data`` and write ``output`` (weights + image_encoder/);
    ``base_config`` configures a single-file ``base``.

    ``output/work/`` keeps the checkpoint: rerunning the same call resumes.
    """
    from transformers import CLIPVisionModelWithProjection

    settings = settings or IPAdapterTraining()
    data, output = Path(data), Path(output)
    pairs = _pairs(data, Path(image_root) if image_root is not None else data.parent)
    output.mkdir(parents=True, exist_ok=True)
    pipe = load_plain_sdxl(base, "cpu", torch.float32, base_config)
    encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder).eval().requires_grad_(False)
    processor = clip_image_processor(encoder)
    unet = pipe.unet
    with tempfile.TemporaryDirectory() as fresh:
        torch.manual_seed(settings.seed)
        save_file(ip_adapter_format.initial_state(unet, encoder.config.projection_dim, seed=settings.seed),
                  str(Path(fresh) / ip_adapter_format.WEIGHT_NAME))
        pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
        pipe.load_ip_adapter(fresh, subfolder="", weight_name=ip_adapter_format.WEIGHT_NAME, image_encoder_folder=None)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, unet):
        module.requires_grad_(False)
    unet.encoder_hid_proj.requires_grad_(True)
    for processor_module in unet.attn_processors.values():
        if hasattr(processor_module, "to_k_ip"):
            processor_module.requires_grad_(True)
    size = settings.resolution
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)

    def step_loss(step: int) -> torch.Tensor:
        rng = step_rng(settings.seed, step)
        generator = step_generator(settings.seed, step)
        chosen = [pairs[i] for i in rng.integers(len(pairs), size=settings.batch_size)]
        images = [load_image(path) for path, _ in chosen]
        captions = [captions[int(rng.integers(len(captions)))] if captions else "" for _, captions in chosen]
        u = rng.random(settings.batch_size)  # [0, D): text dropped, [D, 2D): image, [2D, 3D): both
        drop_text = (u < DROP) | ((u >= 2 * DROP) & (u < 3 * DROP))
        drop_image = (u >= DROP) & (u < 3 * DROP)
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop_text, strict=True)]
        with torch.no_grad():
            pixels = torch.stack([crop_square(image, size)[0] for image in images])
            dist = pipe.vae.encode(pixels).latent_dist
            latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator))
            latents = latents * pipe.vae.config.scaling_factor
            embeds = encoder(**processor(images=images, return_tensors="pt")).image_embeds
            embeds = embeds * torch.from_numpy(~drop_image).float()[:, None]
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                                              do_classifier_free_guidance=False)
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(images),),
                                      generator=generator)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(len(images), -1), "image_embeds": [embeds[:, None]]}
        prediction = unet(noisy, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added).sample
        return F.mse_loss(prediction, noise)

    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    loop = LoopSettings(steps=settings.steps, learning_rate=settings.learning_rate, seed=settings.seed,
                        weight_decay=0.01, schedule="constant", save_every=max(50, settings.steps // 10))
    train("ip-adapter", unet, step_loss, loop, output / "work", progress=progress)
    with atomic_folder(output / "ip-adapter") as staging:
        save_file(ip_adapter_format.loaded_state(unet), str(staging / ip_adapter_format.WEIGHT_NAME))
        encoder.save_pretrained(staging / ip_adapter_format.IMAGE_ENCODER_FOLDER)
    return output / "ip-adapter"
