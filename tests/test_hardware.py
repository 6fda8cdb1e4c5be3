"""The real-size memory calculator builds the published architectures (meta device: nothing allocated)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "hardware.py"


@pytest.fixture(scope="module")
def hardware():
    spec = importlib.util.spec_from_file_location("hardware", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def counts(hardware):
    return hardware.build()


def test_configs_give_the_published_parameter_counts(counts):
    """The stored configs are the real ones: their models have the published sizes."""
    parts = counts["parameters"]
    assert parts["SDXL UNet"] == 2_567_463_684
    assert parts["SDXL VAE"] == 83_653_863
    assert parts["SDXL text encoders"] == 123_060_480 + 694_659_840
    assert parts["Qwen2-VL-2B"] == 2_208_985_600


def test_stage_trainable_sets_and_memory_arithmetic(counts, hardware):
    parts, trainable = counts["parameters"], counts["trainable"]
    head, adapter = parts["EasyRef head (final-layer copy, tokens, projection)"], parts[
        "EasyRef adapter (to_k_ip, to_v_ip)"]
    lora = next(value for name, value in parts.items() if name.startswith("UNet LoRA"))
    # SDXL has 70 cross-attention layers: 10 of width 640 and 60 of 1280, each with to_k_ip and to_v_ip from 2048
    assert adapter == 2 * 2048 * (10 * 640 + 60 * 1280)
    assert trainable["align"] == head + adapter
    # stages 2-3 add the MLLM except its last layer (the trainable copy replaces it) and the LoRA
    projection, tokens, copy_norm = 1536 * 1536 + 1536 + 1536 * 2048 + 2048 + 2 * 2048, 64 * 1536, 1536
    last_layer = head - projection - tokens - copy_norm
    assert trainable["single"] == trainable["multi"] == trainable["align"] + parts["Qwen2-VL-2B"] - last_layer + lora
    needs = hardware.memory(counts)
    assert needs["inference"]["CPU, float32 (RAM)"] == pytest.approx(4 * counts["total"] / 1e9)
    one_gpu = needs["training"]["align"]["one GPU / DDP, per GPU"]
    assert one_gpu == pytest.approx((16 * trainable["align"] + 2 * (counts["total"] - trainable["align"])) / 1e9)


def test_eight_bit_mllm_rows_store_the_mllms_linear_weights_in_one_byte(counts, hardware):
    linear, mllm = counts["mllm_linear_weights"], counts["parameters"]["Qwen2-VL-2B"]
    # Qwen2-VL-2B's Linear weights are most of it; its 151,936 x 1,536 token embedding is the largest rest
    assert 0.8 * mllm < linear < mllm - 151_936 * 1536
    inference = hardware.memory(counts)["inference"]
    assert inference["GPU, MLLM with 8-bit weights (--mllm-quantize int8)"] == pytest.approx(
        (2 * counts["total"] - linear) / 1e9)
    assert inference["CPU, float32, MLLM with 8-bit weights (RAM)"] == pytest.approx(
        (4 * counts["total"] - 3 * linear) / 1e9)
