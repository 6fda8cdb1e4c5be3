"""EasyRefPipeline: SDXL that follows a group of reference images plus a prompt.

Reads top to bottom like a diffusers pipeline: check inputs, encode the references (and the
unconditional branch), hand the tokens to the SDXL pipeline as ``ip_adapter_image_embeds``,
denoise, decode. The diffusers pipeline does the denoising; EasyRef only adds conditioning, so
``pipe.derive(StableDiffusionXLImg2ImgPipeline)`` (or inpainting, ControlNet, ...) gives a
pipeline that shares every weight and takes the same embeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import importlib
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from easyref import adapter as unet_adapter
from easyref import controls
from easyref.config import AGGREGATIONS, EasyRefConfig
from easyref.controls import ReferenceGroup
from easyref.devices import check_offload, empty_device_cache, pick_device, pick_dtype, pick_mllm_dtype
from easyref.encoder import ReferenceEncoder, VisionBatching
from easyref.errors import InvalidArgumentError, ModelFormatError, NonFiniteError, ShapeMismatchError, first_line
from easyref.files import package_versions, read_json
from easyref.hub import has_weights, is_single_file, parts_without_weights, resolve
from easyref.images import image_sha256, load_references
from easyref.prompting import ReferenceProcessor, unconditional_image
from easyref.quantize import check_method, quantize_mllm
from easyref.quiet import quiet_libraries, verbose_logging
from easyref.release import OFFICIAL_NAME
from easyref.single_file import check_base_config, config_in_use, load_single_file_base
from easyref.weights import (
    ADAPTER_WEIGHTS,
    MLLM_WEIGHTS,
    check_finite,
    load_adapter_state,
    load_mllm_state,
    read_safetensors,
    save_adapter,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

ReferenceInput = str | Path | Image.Image
PARTS = ("base", "mllm", "adapter")
MAX_SIDE = 4096
MAX_IMAGES_PER_CALL = 16
# Beyond these the image is noise or overflow: IP-Adapter scales above ~2 and CFG above ~20 already wreck it.
MAX_SCALE = 10.0
# SDXL's text encoders read 77 tokens (about 300 characters); the MLLM's context must also hold every
# reference's tokens. A longer prompt only costs time and memory (100k characters took 29 GB).
MAX_PROMPT_CHARACTERS = 2000
MAX_GUIDANCE = 50.0
CACHE_SIZE = 8


@dataclasses.dataclass
class EasyRefOutput:
    """Generated images plus every setting needed to reproduce them (the CLI's JSON sidecar)."""

    images: list[Image.Image]
    settings: dict[str, Any]


def _model_parts(model: str | Path | None, base, mllm, adapter, base_config=None) -> dict[str, str | Path]:
    given = {"base": base, "mllm": mllm, "adapter": adapter}
    if model is not None and str(model) == OFFICIAL_NAME and not Path(model).exists():
        from easyref.release import RELEASE_BASE, RELEASE_MLLM, official_parts

        # the release's adapter is fetched and converted only when no adapter is given
        official = official_parts(base, mllm, base_config) if adapter is None \
            else {"base": RELEASE_BASE, "mllm": RELEASE_MLLM}
        return {part: given[part] if given[part] is not None else official[part] for part in PARTS}
    parts = {}
    for part in PARTS:
        if given[part] is not None:
            parts[part] = given[part]
        elif model is not None:
            folder = resolve(model, "model")
            if not (folder / part).is_dir():
                raise ModelFormatError(f"model folder {model} has no {part}/ part (or give {part}= explicitly)")
            parts[part] = folder / part
    return parts


def _check_component(base: str | Path, folder: Path, part: str, declared: object) -> None:
    """One line naming the problem for a component ``model_index.json`` declares but the folder cannot
    provide: a class its library does not have (a typo, or a newer library), or a missing subfolder."""
    if part.startswith("_") or not isinstance(declared, list) or len(declared) != 2 or None in declared:
        return
    library, name = declared
    try:
        module = importlib.import_module(str(library))
    except ImportError:
        raise ModelFormatError(f"base model {base}: model_index.json declares {part} from the library {library!r}, "
                               "which is not installed") from None
    if not hasattr(module, str(name)):
        raise ModelFormatError(f"base model {base}: model_index.json declares {part} as {library}.{name}, which "
                               f"this {library} does not have (a typo, or a newer {library} than "
                               f"{getattr(module, '__version__', 'installed')})")
    if not (folder / part).is_dir():
        raise ModelFormatError(f"base model {base}: model_index.json lists {part} but there is no {part}/ folder")


def check_prompt(prompt: object, name: str = "prompt") -> None:
    """A string of at most :data:`MAX_PROMPT_CHARACTERS` characters, checked before any model runs."""
    if not isinstance(prompt, str):
        raise InvalidArgumentError(f"{name} must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARACTERS:
        raise InvalidArgumentError(f"{name} has {len(prompt)} characters; at most {MAX_PROMPT_CHARACTERS} are "
                                   "read (SDXL's text encoders stop at 77 tokens, about 300 characters)")


def check_scale(scale: object, name: str = "scale") -> None:
    """A reference scale: a finite number from 0 (references off) to MAX_SCALE."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or not (
            0 <= scale <= MAX_SCALE):
        raise InvalidArgumentError(f"{name} must be a finite number between 0 and {MAX_SCALE}, got {scale}")


def check_generation_args(*, height: int | None, width: int | None, scale: float, guidance_scale: float,
                          num_inference_steps: int, num_images: int, seed: int,
                          names: Mapping[str, str] | None = None) -> None:
    """Validate numbers before any model runs; each problem is one clear sentence.

    Messages call each value by its Python name, or by ``names[python_name]`` (a command line
    passes its flags, e.g. ``--steps``, so the user reads the option they typed).
    """
    names = names or {}

    def fail(name: str, rule: str, value: object) -> None:
        raise InvalidArgumentError(f"{names.get(name, name)} must be {rule}, got {value}")

    for name, value in (("height", height), ("width", width)):
        if value is not None and (not isinstance(value, int) or value % 8 or not 64 <= value <= MAX_SIDE):
            fail(name, f"a multiple of 8 between 64 and {MAX_SIDE}", value)
    check_scale(scale, names.get("scale", "scale"))
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or not (
            0 <= guidance_scale <= MAX_GUIDANCE):
        fail("guidance_scale", f"a finite number between 0 and {MAX_GUIDANCE}", guidance_scale)
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= 1000:
        fail("num_inference_steps", "between 1 and 1000", num_inference_steps)
    if not isinstance(num_images, int) or not 1 <= num_images <= MAX_IMAGES_PER_CALL:
        fail("num_images", f"between 1 and {MAX_IMAGES_PER_CALL}", num_images)
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        fail("seed", "a non-negative integer", seed)


class EasyRefPipeline:
    """SDXL + Qwen2-VL reference encoder + EasyRef adapter.

    ``base`` is a diffusers ``StableDiffusionXLPipeline``, or ``None`` for an encode-only pipeline
    (saving embeds needs no SDXL); ``encoder`` may be ``None`` for an embeds-only pipeline
    (generation from saved embeds needs no MLLM).
    """

    def __init__(self, base, encoder: ReferenceEncoder | None, config: EasyRefConfig) -> None:
        if base is None and encoder is None:
            raise ModelFormatError("a pipeline needs the base model, the MLLM, or both")
        if base is not None:
            cross = base.unet.config.cross_attention_dim
            if cross != config.cross_attention_dim:
                raise ShapeMismatchError(
                    f"adapter cross_attention_dim {config.cross_attention_dim} does not match the base UNet's {cross}"
                )
            unet_adapter.install_adapter(base.unet, config.num_reference_tokens)
            if config.lora_rank:
                unet_adapter.add_lora(base.unet, config.lora_rank)
        self.base = base
        self.encoder = encoder
        self.config = config
        self.sources: dict[str, str] = {}
        self.loras: dict[str, dict[str, Any]] = {}
        self.offload: str | None = None  # "model" or "sequential" once enabled
        self._execution_device: torch.device | None = None
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # -- construction and persistence --------------------------------------------------------
    @staticmethod
    def load_base(base: str | Path, torch_dtype: torch.dtype | None = None,
                  base_config: str | Path | None = None) -> StableDiffusionXLPipeline:
        """SDXL from a diffusers folder or hub id, or from a single ``.safetensors`` file (a finetune as model
        sites share it) with the pipeline configuration of ``base_config`` (:mod:`easyref.single_file`)."""
        from diffusers import StableDiffusionXLPipeline

        check_base_config(base, base_config)
        if is_single_file(base):
            return load_single_file_base(base, base_config, torch_dtype)
        folder = resolve(base, "base model", "pipeline")
        if not (folder / "model_index.json").is_file():
            raise ModelFormatError(f"base model {base} is not a diffusers pipeline folder (no model_index.json)")
        index = read_json(folder / "model_index.json", ModelFormatError, f"{folder}/model_index.json")
        if not isinstance(index, dict):
            raise ModelFormatError(f"{folder}/model_index.json must hold a JSON object")
        for part, declared in index.items():
            _check_component(base, folder, part, declared)
        # A model part (it has a config.json) without weights: name it, not the last file diffusers tried.
        missing = parts_without_weights(folder)
        if missing:
            raise ModelFormatError(f"base model {base}: {missing[0]}/ has no weights file (*.safetensors or *.bin)")
        return StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch_dtype)

    @staticmethod
    def load_mllm(mllm: str | Path, torch_dtype: torch.dtype | None = None):
        from transformers import AutoModelForImageTextToText

        folder = resolve(mllm, "MLLM", "model")
        if not (folder / "config.json").is_file():
            raise ModelFormatError(f"MLLM {mllm} is not a transformers model folder (no config.json)")
        if not has_weights(folder):
            raise ModelFormatError(f"MLLM {mllm} has no weights file (model.safetensors, its shards, or *.bin)")
        return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch_dtype), folder

    @classmethod
    def create(cls, base: str | Path | Any, mllm: str | Path, *, torch_dtype: torch.dtype | None = None,
               vision_batching: VisionBatching = "auto", base_config: str | Path | None = None,
               **config_kwargs: Any) -> EasyRefPipeline:
        """A new, untrained EasyRef around a base SDXL and a Qwen2-VL (the start of training).

        The final-layer copy starts from the MLLM's last K layers and to_k_ip / to_v_ip from
        the UNet's to_k / to_v, as in the release.
        """
        with quiet_libraries(verbose_logging()):
            if hasattr(base, "unet"):  # a loaded pipeline carries its own configuration
                check_base_config(None, base_config)
                sd = base
            else:
                sd = cls.load_base(base, torch_dtype, base_config)
            model, mllm_folder = cls.load_mllm(mllm, torch_dtype)
        config = EasyRefConfig(mllm_hidden_size=model.config.text_config.hidden_size,
                               cross_attention_dim=sd.unet.config.cross_attention_dim, **config_kwargs)
        with quiet_libraries(verbose_logging()):
            processor = ReferenceProcessor.from_pretrained(mllm_folder, config)
        return cls(sd, ReferenceEncoder(model, processor, config, vision_batching), config)

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, *, base: str | Path | None = None,
                        mllm: str | Path | None = None, adapter: str | Path | None = None,
                        device: str | None = None, torch_dtype: str | torch.dtype | None = None,
                        mllm_dtype: str | torch.dtype | None = None, load_mllm: bool = True, load_base: bool = True,
                        vision_batching: VisionBatching = "auto", mllm_quantize: str | None = None,
                        offload: str | None = None, base_config: str | Path | None = None) -> EasyRefPipeline:
        """Load from a model folder (``base/``, ``mllm/``, ``adapter/``) and/or one source per part.

        Each part is a local folder or a hub id; ``base`` may also be a single-file SDXL ``.safetensors``
        checkpoint, configured by ``base_config`` (a diffusers folder or hub id; default: SDXL base's, its
        config files fetched when not cached). ``torch_dtype`` is SDXL's precision (auto: float16 on
        a GPU, float32 on CPU), ``mllm_dtype`` the MLLM's (auto: bfloat16 on CUDA, else float32; see
        :func:`easyref.devices.pick_mllm_dtype`); the reference tokens are cast to the UNet's dtype.
        ``load_mllm=False`` skips the MLLM: the pipeline then generates only from precomputed embeds.
        ``load_base=False`` skips SDXL: the pipeline then only encodes references.
        ``mllm_quantize="int8"`` gives the MLLM 8-bit weights (:mod:`easyref.quantize`; needs torchao).
        ``offload="model"`` / ``"sequential"`` keeps the weights in CPU RAM and lends ``device`` (a GPU)
        one model / one layer at a time (:meth:`enable_model_cpu_offload`, :meth:`enable_sequential_cpu_offload`).
        """
        if mllm_quantize is not None:
            check_method(mllm_quantize)
        target = pick_device(device)
        if offload is not None:
            check_offload(offload)
            if target.type == "cpu":  # refused before any part is resolved (a download, the release's conversion)
                raise InvalidArgumentError(f"offload={offload!r} lends a GPU one part at a time, but the device is "
                                           "the CPU; offload is for a GPU with too little memory for every part "
                                           "at once")
        check_base_config(base, base_config)  # before a download or the release's conversion
        parts = _model_parts(model, base, mllm, adapter, base_config)
        needed = ("adapter",) + (("base",) if load_base else ()) + (("mllm",) if load_mllm else ())
        for part in needed:
            if part not in parts:
                raise ModelFormatError(f"no {part} given: pass a model folder or {part}=...")
        dtype = pick_dtype(torch_dtype, target)
        encoder_dtype = pick_mllm_dtype(mllm_dtype, target, dtype)
        adapter_folder = resolve(parts["adapter"], "adapter")
        config = EasyRefConfig.load(adapter_folder)
        with quiet_libraries(verbose_logging()):
            sd = cls.load_base(parts["base"], dtype, base_config) if load_base else None
            encoder = None
            if load_mllm:
                model_, mllm_folder = cls.load_mllm(parts["mllm"], encoder_dtype)
                processor = ReferenceProcessor.from_pretrained(mllm_folder, config)
                encoder = ReferenceEncoder(model_, processor, config, vision_batching)
        pipe = cls(sd, encoder, config)
        pipe.load_adapter(adapter_folder)
        pipe.sources = {part: str(parts[part]) for part in parts}
        config_used = config_in_use(parts["base"], base_config) if "base" in parts else None
        if config_used is not None:
            pipe.sources["base_config"] = config_used
        if offload is None:
            pipe.to(target)
        if mllm_quantize is not None and encoder is not None:
            quantize_mllm(encoder, mllm_quantize)
        if offload is not None:
            pipe._enable_offload(offload, target)
        return pipe

    def load_adapter(self, folder: str | Path) -> None:
        """Load EasyRef weights (and finetuned MLLM weights, when present) from an adapter folder."""
        folder = Path(folder)
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise ModelFormatError(f"adapter folder {folder} has no {ADAPTER_WEIGHTS}")
        unet = self.base.unet if self.base is not None else None
        state = read_safetensors(weights)
        check_finite(state, str(weights))
        load_adapter_state(state, self.encoder, unet, str(weights))
        if self.encoder is not None and (folder / MLLM_WEIGHTS).is_file():
            mllm_state = read_safetensors(folder / MLLM_WEIGHTS)
            check_finite(mllm_state, str(folder / MLLM_WEIGHTS))
            load_mllm_state(self.encoder, mllm_state, str(folder / MLLM_WEIGHTS))
        self.clear_cache()

    def load_lora(self, source: str | Path, weight: float = 1.0, name: str | None = None) -> str:
        """Add an SDXL LoRA (a ``.safetensors`` file, or a folder / hub id with one) at ``weight``; returns its name.

        It loads through diffusers' ``load_lora_weights`` (kohya and diffusers formats) as a peft adapter
        next to EasyRef's own UNet LoRA, which stays active at weight 1 (``set_adapters``).
        """
        self._require_base()
        _check_lora_weight(weight)
        name = name or f"lora_{len(self.loras)}"
        if name in self.loras or name == unet_adapter.LORA_ADAPTER_NAME:
            raise InvalidArgumentError(f"a LoRA named {name!r} is already loaded")
        path = Path(source)
        location = {"pretrained_model_name_or_path_or_dict": str(path.parent), "weight_name": path.name} \
            if path.is_file() else {"pretrained_model_name_or_path_or_dict": str(source)}
        try:
            with quiet_libraries(verbose_logging()):
                self.base.load_lora_weights(**location, adapter_name=name)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise ModelFormatError(f"LoRA {source} does not load into this base model: {first_line(exc)}") from None
        self.loras[name] = {"source": str(source), "weight": float(weight)}
        self._activate_loras()
        return name

    def set_lora_weight(self, name: str, weight: float) -> None:
        """Change a loaded LoRA's weight (0 switches it off without unloading it)."""
        if name not in self.loras:
            raise InvalidArgumentError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.loras) or 'none'})")
        _check_lora_weight(weight)
        self.loras[name]["weight"] = float(weight)
        self._activate_loras()

    def _activate_loras(self) -> None:
        names = list(self.loras)
        weights = [entry["weight"] for entry in self.loras.values()]
        if unet_adapter.LORA_ADAPTER_NAME in getattr(self.base.unet, "peft_config", {}):
            names, weights = [unet_adapter.LORA_ADAPTER_NAME, *names], [1.0, *weights]
        self.base.set_adapters(names, weights)

    def save_pretrained(self, folder: str | Path, include_mllm_weights: bool = False) -> Path:
        """Write ``base/``, ``mllm/`` and ``adapter/``; each part loads on its own.

        The base is saved without EasyRef's processors (they live in the adapter), so ``base/``
        stays a plain SDXL folder.
        """
        if self.encoder is None or self.base is None:
            raise ModelFormatError("a pipeline loaded without a part (MLLM or base) cannot be saved as a full model")
        if self.encoder.quantization is not None:
            raise ModelFormatError(f"a pipeline whose MLLM is quantized ({self.encoder.quantization}) cannot be saved: "
                                   "its full-precision weights are gone; load it without mllm_quantize to save")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_adapter(folder / "adapter", self.config, self.encoder, self.base.unet)
        self._save_plain_base(folder / "base")
        mllm_folder = folder / "mllm"
        self.encoder.mllm_for_saving().save_pretrained(mllm_folder)
        self.encoder.processor.save_pretrained(mllm_folder)
        return folder

    def _save_plain_base(self, folder: Path) -> None:
        from diffusers import UNet2DConditionModel

        unet = self.base.unet
        plain = UNet2DConditionModel.from_config({**unet.config, "encoder_hid_dim_type": None})
        state = {key: value for key, value in unet.state_dict().items()
                 if ".processor." not in key and not key.startswith("encoder_hid_proj")
                 and "lora_" not in key}
        state = {key.replace(".base_layer.", "."): value for key, value in state.items()}
        plain.load_state_dict(state)
        components = {**self.base.components, "unet": plain.to(unet.dtype)}
        # Pipeline options kept in its config (e.g. SDXL's force_zeros_for_empty_prompt) travel too:
        # the unconditional input must stay the one the base was trained with.
        accepted = inspect.signature(type(self.base).__init__).parameters
        options = {key: value for key, value in self.base.config.items()
                   if key in accepted and key not in components}
        type(self.base)(**components, **options).save_pretrained(folder)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> EasyRefPipeline:
        if self.offload is not None:
            raise InvalidArgumentError(f"this pipeline offloads its models ({self.offload}) to {self.device}; "
                                       "load it again without offload to place it with .to()")
        if self.base is not None:
            self.base.to(device, dtype) if dtype is not None else self.base.to(device)
        if self.encoder is not None:
            self.encoder.to(device=device, dtype=dtype)
        self.clear_cache()
        return self

    @property
    def device(self) -> torch.device:
        """Where the models compute: with offload the GPU they are lent to, not the CPU they wait on."""
        if self._execution_device is not None:
            return self._execution_device
        return self.base.unet.device if self.base is not None else self.encoder.device

    # -- offload -----------------------------------------------------------------------------
    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> None:
        """Keep every model in CPU RAM and move each whole onto ``device`` only while it runs: the MLLM
        while it encodes a group, then SDXL's text encoders, UNet and VAE in turn (diffusers' model
        offload). GPU memory then peaks at the largest part instead of the sum, for a small cost in
        time (one transfer per part per call)."""
        self._enable_offload("model", pick_device(device))

    def enable_sequential_cpu_offload(self, device: str | torch.device | None = None) -> None:
        """Move each layer onto ``device`` only for its own forward pass (accelerate's ``cpu_offload``,
        diffusers' sequential offload for SDXL): the least GPU memory, and several times slower.
        EasyRef's small head (final layers, tokens, projection) stays on ``device``."""
        self._enable_offload("sequential", pick_device(device))

    def _enable_offload(self, mode: str, device: torch.device) -> None:
        if self.offload is not None:
            raise InvalidArgumentError(f"offload is already enabled ({self.offload}); load the pipeline again to "
                                       "change it")
        check_offload(mode)
        if self.base is not None:
            enable = (self.base.enable_model_cpu_offload if mode == "model"
                      else self.base.enable_sequential_cpu_offload)
            enable(device=device)
        if self.encoder is not None:
            self.encoder.to("cpu")
            if mode == "sequential":
                from accelerate import cpu_offload

                cpu_offload(self.encoder.mllm, execution_device=device)
                for module in self.encoder.head_modules().values():
                    module.to(device)
        self.offload = mode
        self._execution_device = device
        self.clear_cache()

    @contextlib.contextmanager
    def _encoder_lent(self):
        """With model offload, the MLLM sits on the GPU only inside this block."""
        if self.offload != "model":
            yield
            return
        self.encoder.to(self._execution_device)
        try:
            yield
        finally:
            self.encoder.to("cpu")
            empty_device_cache(self._execution_device)

    def _require_base(self) -> None:
        if self.base is None:
            raise ModelFormatError("this pipeline was loaded without the base model (load_base=False); it only encodes")

    def derive(self, pipeline_class: type, **components: Any):
        """A diffusers pipeline of ``pipeline_class`` sharing this pipeline's weights.

        ``pipe.derive(StableDiffusionXLControlNetPipeline, controlnet=cn)`` gives ControlNet
        (the ControlNet sees the text only; the UNet gets the reference tokens).
        """
        self._require_base()
        return pipeline_class.from_pipe(self.base, **components)

    # -- encoding ----------------------------------------------------------------------------
    def clear_cache(self) -> None:
        self._cache.clear()

    def set_config(self, **changes: Any) -> None:
        """Change adapter settings everywhere they are read (pipeline, encoder, processor) at once.

        The three share one :class:`EasyRefConfig`; replacing it in one place only would let them
        disagree (e.g. the encoder aggregating one way and the cache keying another).
        """
        config = dataclasses.replace(self.config, **changes)
        self.config = config
        if self.encoder is not None:
            self.encoder.config = config
            self.encoder.processor.config = config
        self.clear_cache()

    def set_aggregation(self, aggregation: str) -> None:
        """Switch how a group becomes tokens (``tokens``, ``average``, ``concat``; paper Table 5).

        The three read the same trained parameters. Switching a ``tokens``-trained adapter at
        inference only approximates the paper's Table 5 rows, which train each variant
        (``easyref train --aggregation``).
        """
        if aggregation not in AGGREGATIONS:
            raise InvalidArgumentError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        self.set_config(aggregation=aggregation)

    def free_encoder(self) -> None:
        """Drop the MLLM to give its memory to SDXL once the groups are encoded.

        Groups already encoded stay cached (and the unconditional branch is encoded now), so they
        still generate with any seed, steps or size; a new group then needs a pipeline with the MLLM.
        """
        if self.encoder is None:
            return
        self.unconditional_embeds()
        self.encoder = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _encode(self, images: Sequence[Image.Image], prompt: str) -> torch.Tensor:
        key = hashlib.sha256(
            "\n".join([self.config.aggregation, prompt, *(image_sha256(im) for im in images)]).encode()
        ).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if self.encoder is None:
            raise ModelFormatError("this pipeline has no MLLM (loaded without it, or dropped by free_encoder()) and "
                                   "this group is not among those it encoded; pass precomputed embeds")
        with torch.no_grad(), self._encoder_lent():
            embeds = self.encoder.encode([list(images)], [prompt])
        if not bool(torch.isfinite(embeds).all()):
            raise NonFiniteError(f"the reference encoder produced NaN or infinite tokens in {self.encoder.dtype}; "
                                 "run the MLLM in float32 or bfloat16 (--mllm-dtype), not float16")
        self._cache[key] = embeds
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return embeds

    def encode_references(self, references: Sequence[ReferenceInput], prompt: str = "") -> torch.Tensor:
        """Conditioning tokens for a group: (1, num_reference_tokens, cross_attention_dim)."""
        check_prompt(prompt)
        images = load_references(references, self.config.max_references)
        return self._encode(images, prompt)

    def unconditional_embeds(self) -> torch.Tensor:
        """The release's unconditional branch: a black image with the instruction and no prompt.

        It depends only on the weights, so it is computed once and cached.
        """
        return self._encode([unconditional_image()], "")

    def ip_adapter_embeds(self, references: Sequence[ReferenceInput] | None = None, prompt: str = "", *,
                          embeds: torch.Tensor | None = None, negative_embeds: torch.Tensor | None = None,
                          negative_references: Sequence[ReferenceInput] | None = None,
                          negative_prompt: str = "", guidance: bool = True) -> list[torch.Tensor]:
        """``ip_adapter_image_embeds`` for any diffusers SDXL pipeline: ``[(2 or 1, 1, T, dim)]``.

        With guidance the unconditional half comes first (diffusers' convention): the black
        image, or the encoded ``negative_references`` when given.
        """
        if embeds is None:
            if references is None:
                raise InvalidArgumentError("give references or precomputed embeds")
            embeds = self.encode_references(references, prompt)
        self._check_embeds(embeds, "embeds")
        dtype = self.base.unet.dtype if self.base is not None else self.encoder.dtype
        cond = embeds.to(self.device, dtype)
        if not guidance:
            return [cond.unsqueeze(1)]
        if negative_embeds is None:
            negative_embeds = (self.encode_references(negative_references, negative_prompt)
                               if negative_references else self.unconditional_embeds())
        self._check_embeds(negative_embeds, "negative embeds")
        uncond = _match_length(negative_embeds.to(cond), cond.shape[1])
        return [torch.cat([uncond, cond]).unsqueeze(1)]

    def _check_embeds(self, embeds: torch.Tensor, what: str) -> None:
        if (embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[1] < 1
                or embeds.shape[2] != self.config.cross_attention_dim):
            raise ShapeMismatchError(
                f"{what} have shape {tuple(embeds.shape)}; this model needs (1, tokens >= 1, "
                f"{self.config.cross_attention_dim})"
            )
        if not embeds.is_floating_point():
            raise ShapeMismatchError(f"{what} are {str(embeds.dtype).removeprefix('torch.')}, not floating point")
        if not bool(torch.isfinite(embeds).all()):
            raise NonFiniteError(f"{what} hold NaN or infinite values")

    # -- generation --------------------------------------------------------------------------
    def sidecar(self, result: EasyRefOutput, image_names: Sequence[str]) -> dict[str, Any]:
        """The reproducibility record written next to generated images (CLI and web app alike):
        every setting, the seed, where the model ran and the library versions. Callers add what
        they alone know (the references' hashes, the command line)."""
        return {
            "images": list(image_names),
            "seed": result.settings["seed"],
            "settings": result.settings,
            "device": str(self.device),
            "offload": self.offload,
            "dtype": str(self.base.unet.dtype).removeprefix("torch."),
            "mllm_dtype": str(self.encoder.dtype).removeprefix("torch.") if self.encoder is not None else None,
            "mllm_quantization": self.encoder.quantization if self.encoder is not None else None,
            "versions": package_versions(),
        }

    def __call__(self, references: Sequence[ReferenceInput] | None = None, prompt: str = "", *,
                 embeds: torch.Tensor | None = None, negative_embeds: torch.Tensor | None = None,
                 negative_references: Sequence[ReferenceInput] | None = None,
                 negative_prompt: str | None = None, seed: int = 0, num_inference_steps: int = 30,
                 guidance_scale: float = 5.0, scale: float = 1.0, height: int | None = None,
                 width: int | None = None, num_images: int = 1, pipeline: Any = None,
                 progress: bool = True, ref_start: float = 0.0, ref_end: float = 1.0,
                 ref_layers: str | dict[str, Any] | None = None, ref_mask: ReferenceInput | None = None,
                 groups: Sequence[ReferenceGroup] | None = None, **pipeline_kwargs: Any) -> EasyRefOutput:
        """Generate ``num_images`` images following the references and the prompt.

        ``scale`` weighs the reference tokens (0 switches them off: exactly the base model's image
        for an adapter without a UNet LoRA; a LoRA from stages single/multi still acts; 1 the
        trained strength). ``negative_prompt=None`` takes the adapter's default (the release's
        "monochrome, lowres, ..."); ``""`` is no negative text: SDXL's zero embeddings where the base
        pipeline zeroes an empty negative prompt, as diffusers does for ``None``.
        ``pipeline`` is an optional derived diffusers pipeline (img2img, inpainting, ControlNet)
        whose extra inputs go in ``pipeline_kwargs``.

        ``ref_start`` / ``ref_end`` restrict the references to that fraction of the denoising steps
        (e.g. ``ref_end=0.5``: the layout follows them, the details only the prompt). ``ref_layers``
        restricts them to some layers: ``"style"``, ``"composition"``, ``"style+composition"``
        (InstantStyle's blocks of SDXL's UNet) or diffusers' per-block dictionary, each value
        multiplied by ``scale``. ``ref_mask`` (an image, white where they act) restricts them to a region.

        ``groups`` replaces ``references`` / ``embeds`` and those five controls with several
        :class:`ReferenceGroup` s at once, each with its own; ``negative_references`` /
        ``negative_embeds`` then stand in for the first group's unconditional branch.
        """
        check_generation_args(height=height, width=width, scale=scale, guidance_scale=guidance_scale,
                              num_inference_steps=num_inference_steps, num_images=num_images, seed=seed)
        check_prompt(prompt)
        if negative_prompt is not None:
            check_prompt(negative_prompt, "negative_prompt")
        groups = _groups(references, embeds, scale, ref_start, ref_end, ref_layers, ref_mask, groups)
        windows = [controls.active_steps(num_inference_steps, group.start, group.end) for group in groups]
        self._require_base()
        target = pipeline if pipeline is not None else self.base
        if target.unet is not self.base.unet:
            raise InvalidArgumentError("pipeline must share this EasyRef UNet: build it with pipe.derive(...)")
        default_side = self.base.default_sample_size * self.base.vae_scale_factor
        height, width = height or default_side, width or default_side
        masks = [None if group.mask is None else controls.load_mask(group.mask, height, width) for group in groups]
        mask_hashes = [None if mask is None else mask[1] for mask in masks]
        masks = [None if mask is None else mask[0] for mask in masks]
        guidance = guidance_scale > 1
        if negative_prompt is None:
            negative_prompt = self.config.negative_prompt
        ip_embeds = []
        for index, group in enumerate(groups):
            first = index == 0
            ip_embeds += self.ip_adapter_embeds(
                group.references, prompt if group.prompt is None else group.prompt, embeds=group.embeds,
                negative_embeds=negative_embeds if first else None,
                negative_references=negative_references if first else None,
                negative_prompt=negative_prompt, guidance=guidance)
        if any(mask is not None for mask in masks):
            pipeline_kwargs["cross_attention_kwargs"] = {**(pipeline_kwargs.get("cross_attention_kwargs") or {}),
                                                         "ip_adapter_masks": masks}
        generator = torch.Generator("cpu").manual_seed(seed)
        target.set_progress_bar_config(disable=not progress)
        callback = _refuse_non_finite_latents(pipeline_kwargs.get("callback_on_step_end"))
        with unet_adapter.group_slots(self.base.unet, len(groups)):
            controls.apply_layer_scales(self.base, [float(group.scale) for group in groups],
                                        [group.layers for group in groups])
            if any(len(window) < num_inference_steps for window in windows):
                callback = controls.step_window(self.base.unet, windows, callback)
            pipeline_kwargs["callback_on_step_end"] = callback
            result = target(prompt=prompt, negative_prompt=negative_prompt or None,
                            ip_adapter_image_embeds=ip_embeds, generator=generator,
                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                            height=height, width=width, num_images_per_prompt=num_images, **pipeline_kwargs)
        first = groups[0]
        settings = {
            "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "scale": first.scale,
            "height": height, "width": width, "num_images": num_images,
            "ref_start": first.start, "ref_end": first.end, "ref_layers": _layers_record(first.layers),
            "ref_mask": mask_hashes[0],
            "pipeline": type(target).__name__, "adapter_config": self.config.to_dict(), "sources": self.sources,
            "loras": {name: dict(entry) for name, entry in self.loras.items()},
        }
        if len(groups) > 1:
            settings["groups"] = [{"prompt": group.prompt, "scale": group.scale, "ref_start": group.start,
                                   "ref_end": group.end, "ref_layers": _layers_record(group.layers),
                                   "ref_mask": mask_hash} for group, mask_hash in zip(groups, mask_hashes, strict=True)]
        return EasyRefOutput(images=list(result.images), settings=settings)


def _check_lora_weight(weight: object) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise InvalidArgumentError(f"a LoRA weight must be a finite number, got {weight!r}")


def _groups(references, embeds, scale: float, start: float, end: float, layers, mask,
            groups: Sequence[ReferenceGroup] | None) -> list[ReferenceGroup]:
    """The call's groups: the one made of the single-group arguments, or ``groups`` (then those must be unset)."""
    if groups is None:
        return [ReferenceGroup(references=references, embeds=embeds, scale=scale, mask=mask, start=start, end=end,
                               layers=layers)]
    if references is not None or embeds is not None:
        raise InvalidArgumentError("give references / embeds or groups, not both")
    if (scale, start, end, layers, mask) != (1.0, 0.0, 1.0, None, None):
        raise InvalidArgumentError("with groups, set scale, mask, start, end and layers on each ReferenceGroup")
    groups = list(groups)
    if not groups or not all(isinstance(group, ReferenceGroup) for group in groups):
        raise InvalidArgumentError("groups must be a non-empty list of ReferenceGroup")
    for group in groups:
        check_scale(group.scale, "a group's scale")
        if group.prompt is not None:
            check_prompt(group.prompt, "a group's prompt")
    return groups


def _layers_record(layers: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """The layers as the sidecar keeps them: the preset of every layer is the plain case, recorded as none."""
    return None if layers == "all" else layers


def _refuse_non_finite_latents(user_callback: Callable | None) -> Callable:
    """A diffusers step callback that refuses latents holding NaN or Inf (they would decode to a black image
    reported as a success), after running the caller's own callback, if any.

    Every step's finiteness is kept on the device and read once, at the last step (``pipe.num_timesteps``):
    reading it each step would make the CPU wait for the GPU 30 times per image, so it could no longer
    queue the next step's kernels while the current ones run.
    """
    flags: list[torch.Tensor] = []

    def callback(pipe, step: int, timestep, tensors: dict) -> dict:
        if user_callback is not None:
            tensors = user_callback(pipe, step, timestep, tensors)
        latents = tensors.get("latents")
        if latents is not None:
            flags.append(torch.isfinite(latents).all())
        last = getattr(pipe, "num_timesteps", None)
        if flags and (last is None or step >= last - 1):
            finite = torch.stack(flags).tolist()
            flags.clear()
            if not all(finite):
                first = finite.index(False) + step + 1 - len(finite)
                raise NonFiniteError(f"the latents became NaN or infinite at denoising step {first + 1}: lower "
                                     f"--scale / --guidance-scale, or run SDXL in float32 (--dtype float32)")
        return tensors

    return callback


def _match_length(uncond: torch.Tensor, length: int) -> torch.Tensor:
    """Tile or cut the unconditional tokens to ``length`` (``concat`` groups vary in length)."""
    if uncond.shape[1] == length:
        return uncond
    repeats = math.ceil(length / uncond.shape[1])
    return uncond.repeat(1, repeats, 1)[:, :length]
