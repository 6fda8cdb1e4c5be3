"""8-bit MLLM weights (torchao): the body is quantized, EasyRef's own layers are not, the tokens barely move."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from easyref.cli import main
from easyref.errors import InvalidArgumentError, ModelFormatError
from easyref.hub import bundled_folder
from easyref.pipeline import EasyRefPipeline

from conftest import random_image

pytest.importorskip("torchao")
REFS = [random_image(48, 48, 1), random_image(40, 56, 2)]
BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "quantized_mllm.py"


def _linear_weights(module: nn.Module) -> list[torch.Tensor]:
    return [layer.weight for layer in module.modules() if isinstance(layer, nn.Linear)]


def test_int8_quantizes_the_mllm_body_only_and_the_tokens_stay_close(tiny_model, tiny_pipe, tmp_path):
    pipe = EasyRefPipeline.from_pretrained(tiny_model, device="cpu", torch_dtype="float32", mllm_quantize="int8")
    body = _linear_weights(pipe.encoder.mllm)
    assert body and all(type(weight) is not nn.Parameter and type(weight) is not torch.Tensor for weight in body)
    own = _linear_weights(pipe.encoder.final) + _linear_weights(pipe.encoder.projection)
    assert own and all(type(weight) is nn.Parameter for weight in own)
    exact, quantized = (p.encode_references(REFS, "a cat") for p in (tiny_pipe, pipe))
    assert not torch.equal(exact, quantized)
    cosine = nn.functional.cosine_similarity(exact.flatten(), quantized.flatten(), dim=0)
    assert cosine > 0.99
    assert pipe.sidecar(pipe(REFS, "a cat", num_inference_steps=1, height=64, width=64, progress=False),
                        ["x.png"])["mllm_quantization"] == "int8"
    with pytest.raises(ModelFormatError, match="quantized .*cannot be saved"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_an_unknown_method_is_refused_before_loading(tmp_path, capsys):
    with pytest.raises(InvalidArgumentError, match="must be one of int8"):
        EasyRefPipeline.from_pretrained(tmp_path / "no-such-model", mllm_quantize="int4")
    assert main(["encode", "--model", str(tmp_path), "--ref", "x.png", "--prompt", "", "--output", "e.safetensors",
                 "--mllm-quantize", "int4"]) == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_the_command_line_records_the_quantization(tiny_model, tmp_path):
    REFS[0].save(tmp_path / "ref.png")
    assert main(["generate", "--model", str(tiny_model), "--ref", str(tmp_path / "ref.png"), "--prompt", "x",
                 "--steps", "1", "--height", "64", "--width", "64", "--output", str(tmp_path / "out.png"),
                 "--mllm-quantize", "int8"]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["mllm_quantization"] == "int8"


def test_the_drift_benchmark_compares_the_two_precisions_side_by_side():
    spec = importlib.util.spec_from_file_location("quantized_mllm", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    tiny = benchmark.tiny(2)
    assert 0.99 < tiny["cosine_min"] <= tiny["cosine_mean"] < 1.0
    if (bundled_folder("shapesworld") / "adapter").is_dir():
        result = benchmark.shapesworld(1)
        assert 0.25 < result["weight_bytes_ratio"] < 0.75  # Linear weights 1 byte, not 4; embeddings stay float32
        for split in ("held-in", "held-out"):
            assert 0.9 < result[split]["cosine_min"] < 1.0
            assert {f"{name}_{key}" for name in ("float32", "int8") for key in ("concept_ok", "prompt_ok")} <= set(
                result[split])
