"""Reading and writing the ``adapter/`` folder: config.json, model.safetensors, mllm.safetensors.

``model.safetensors`` holds everything EasyRef adds: ``final.*`` (final-layer copy, norm,
reference tokens), ``projection.*``, ``unet.<processor>.to_k_ip.0.weight`` / ``to_v_ip``
and, with LoRA, ``unet_lora.*`` (peft's state dict of the UNet LoRA). ``mllm.safetensors`` is
present only when a training stage finetuned the MLLM; it replaces the base MLLM's weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from easyref import adapter as unet_adapter
from easyref.config import CONFIG_NAME, EasyRefConfig
from easyref.errors import ModelFormatError, NonFiniteError, ShapeMismatchError
from easyref.files import atomic_write, write_json

ADAPTER_WEIGHTS = "model.safetensors"
MLLM_WEIGHTS = "mllm.safetensors"
MLLM_PREFIX = "model."


def encoder_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": value for prefix, module in encoder.head_modules().items()
            for key, value in module.state_dict().items()}


def unet_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"unet.{name}.{key}": value for name, processor in unet_adapter.adapter_processors(unet).items()
             for key, value in processor.state_dict().items()}
    state.update({f"unet_lora.{key}": value for key, value in unet_adapter.lora_state_dict(unet).items()})
    return state


def adapter_state_dict(encoder: nn.Module | None, unet: nn.Module) -> dict[str, torch.Tensor]:
    state = encoder_state_dict(encoder) if encoder is not None else {}
    state.update(unet_state_dict(unet))
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}


def _check_shapes(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ModelFormatError(f"{source} lacks {len(missing)} weights, e.g. {missing[0]}")
    for key, value in expected.items():
        if tuple(given[key].shape) != tuple(value.shape):
            raise ShapeMismatchError(
                f"{source}: {key} has shape {tuple(given[key].shape)} but the model needs {tuple(value.shape)}"
            )


def load_adapter_state(state: dict[str, torch.Tensor], encoder: nn.Module | None, unet: nn.Module | None,
                       source: str) -> None:
    """Load ``state`` into the encoder head and the UNet, each if given, checking every shape first.

    A part that is not given (embeds-only or encode-only pipelines) leaves its weights unused.
    """
    known: set[str] = set()
    ignored: tuple[str, ...] = ()
    lora = {key[len("unet_lora."):]: value for key, value in state.items() if key.startswith("unet_lora.")}
    unet_keys = {key: value for key, value in state.items() if key.startswith("unet.")}
    if unet is not None:
        expected_unet = unet_state_dict(unet)
        _check_shapes(expected_unet, {**unet_keys, **{f"unet_lora.{k}": v for k, v in lora.items()}}, source)
        known |= set(expected_unet)
    else:
        ignored += ("unet.", "unet_lora.")
    if encoder is not None:
        expected_head = encoder_state_dict(encoder)
        head = {key: state[key] for key in expected_head if key in state}
        _check_shapes(expected_head, head, source)
        for prefix, module in encoder.head_modules().items():
            module.load_state_dict({key[len(prefix) + 1:]: value for key, value in head.items()
                                    if key.startswith(prefix + ".")})
        known |= set(expected_head)
    else:
        ignored += ("final.", "projection.")
    unexpected = sorted(key for key in state if key not in known and not key.startswith(ignored))
    if unexpected:
        raise ModelFormatError(f"{source} holds weights this model has no place for, e.g. {unexpected[0]}")
    if unet is None:
        return
    with torch.no_grad():
        current = dict(unet.named_parameters())
        for key, value in unet_keys.items():
            current[key[len("unet."):]].copy_(value)
    if lora:
        unet_adapter.load_lora_state_dict(unet, lora)


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf (a diverged run, a damaged file): they would make black images."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"{source}: tensor {key} holds NaN or infinite values (a diverged run or a "
                                 "damaged file); these weights would only make black images")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(f"{path} is not a readable safetensors file ({exc})") from None


def save_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    state = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata or {"format": "pt"}))


def save_adapter(folder: str | Path, config: EasyRefConfig, encoder: nn.Module | None, unet: nn.Module,
                 mllm_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``mllm.safetensors``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / ADAPTER_WEIGHTS, adapter_state_dict(encoder, unet))
    if mllm_state is not None:
        save_safetensors(folder / MLLM_WEIGHTS, mllm_state)
    write_json(folder / CONFIG_NAME, config.to_dict())
    return folder


def mllm_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's MLLM weights in ``Qwen2VLForConditionalGeneration`` naming (``model.*``)."""
    return {MLLM_PREFIX + key: value for key, value in encoder.mllm.state_dict().items()}


def load_mllm_state(encoder: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Replace the backbone's weights by finetuned ones, every shape checked."""
    stripped = {key[len(MLLM_PREFIX):] if key.startswith(MLLM_PREFIX) else key: value
                for key, value in state.items()}
    expected = encoder.mllm.state_dict()
    unexpected = sorted(set(stripped) - set(expected))
    if unexpected:
        raise ModelFormatError(f"{source} holds MLLM weights this model has no place for, e.g. {unexpected[0]}")
    for key, value in stripped.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ShapeMismatchError(
                f"{source}: {key} has shape {tuple(value.shape)} but the MLLM needs {tuple(expected[key].shape)}"
            )
    encoder.mllm.load_state_dict(stripped, strict=False)
