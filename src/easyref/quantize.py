"""8-bit MLLM weights: Qwen2-VL-2B's 4.4 GB in bf16 become about half, on CPU and GPU alike.

Only the MLLM's body (vision tower and language model) is quantized, weight-only int8 through
torchao (maintained by the PyTorch team; it runs on CPU, unlike bitsandbytes). EasyRef's own final
layers, reference tokens and projection keep their precision: they are small, and they are what
training changed. ``benchmarks/quantized_mllm.py`` measures what it costs in embedding drift.
"""

from __future__ import annotations

from easyref.errors import InvalidArgumentError

QUANTIZATIONS = ("int8",)


def check_method(method: str) -> None:
    """Refuse an unknown method before any model loads."""
    if method not in QUANTIZATIONS:
        raise InvalidArgumentError(f"MLLM quantization must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")


def quantize_mllm(encoder, method: str) -> None:
    """Quantize ``encoder``'s MLLM body in place (``method``: one of :data:`QUANTIZATIONS`)."""
    check_method(method)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise InvalidArgumentError("8-bit MLLM weights need torchao: pip install 'easyref[quantize]'") from None
    quantize_(encoder.mllm, Int8WeightOnlyConfig())
    encoder.quantization = method
