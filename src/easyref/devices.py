"""Device and dtype choice in one place (never a hard-coded "cuda")."""

from __future__ import annotations

import torch

from easyref.errors import InvalidArgumentError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_device(name: str | None = None) -> torch.device:
    """``None``/"auto": CUDA if present, then Apple MPS, else CPU."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidArgumentError(f"unknown device {name!r} (try cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {name} asked for but CUDA is not available")
    return device


def pick_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": float16 on CUDA/MPS (half the memory), float32 on CPU (fp16 is slow there)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def pick_mllm_dtype(name: str | torch.dtype | None, device: torch.device, base_dtype: torch.dtype) -> torch.dtype:
    """The MLLM's precision. ``None``/"auto": bfloat16 on a CUDA GPU that has it (the release's choice:
    Qwen2's activations overflow float16), else float32; float32 too when the base runs in float32,
    so asking for full precision gets it everywhere."""
    if name not in (None, "auto"):
        return pick_dtype(name, device)
    if device.type == "cuda" and base_dtype != torch.float32 and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


OFFLOAD_MODES = ("model", "sequential")


def check_offload(mode: str) -> None:
    """One of :data:`OFFLOAD_MODES`, checked before any model loads."""
    if mode not in OFFLOAD_MODES:
        raise InvalidArgumentError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")


def empty_device_cache(device: torch.device) -> None:
    """Give memory the caching allocator holds back to the device (after a model left it)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
