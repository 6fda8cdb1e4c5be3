"""Offload: the weights wait in CPU RAM and the device gets one model (or one layer) at a time.

A CPU has no second memory to lend, so these tests lend the CPU to itself: what they check is that
the images and tokens are exactly those of the resident pipeline, that the MLLM is moved in only
around its encoding (model offload), and that its weights are absent between calls (sequential).
The memory saved on a real GPU is measured by ``benchmarks/full_size.py`` (``gpu_check.sh``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from easyref.cli import main
from easyref.errors import InvalidArgumentError
from easyref.pipeline import EasyRefPipeline

from conftest import random_image

REFS = [random_image(48, 48, 1), random_image(40, 56, 2)]
GENERATE = {"prompt": "a cat", "seed": 3, "num_inference_steps": 2, "height": 64, "width": 64, "progress": False}


def _pixels(pipe: EasyRefPipeline) -> np.ndarray:
    return np.asarray(pipe(REFS, **GENERATE).images[0])


def test_model_offload_lends_the_mllm_only_while_it_encodes_and_changes_no_pixel(tiny_model, tiny_pipe,
                                                                                one_thread, monkeypatch):
    pipe = EasyRefPipeline.from_pretrained(tiny_model, device="cpu", torch_dtype="float32")
    pipe.enable_model_cpu_offload(device="cpu")
    events = []
    encoder = pipe.encoder
    original_to, original_backbone = encoder.to, encoder.backbone
    monkeypatch.setattr(encoder, "to", lambda *a, **k: events.append(("to", str(k.get("device", a[0] if a else None))))
                        or original_to(*a, **k))
    monkeypatch.setattr(encoder, "backbone", lambda *a, **k: events.append(("encode",)) or original_backbone(*a, **k))
    assert np.array_equal(_pixels(pipe), _pixels(tiny_pipe))
    # two encodings (the group, then the black-image unconditional branch), each inside its own lend
    assert events == [("to", "cpu"), ("encode",), ("to", "cpu")] * 2
    # SDXL's own parts got diffusers' offload hooks
    assert pipe.base.unet._hf_hook is not None and pipe.base.text_encoder._hf_hook is not None
    record = pipe.sidecar(pipe(REFS, **GENERATE), ["x.png"])
    assert record["offload"] == "model" and record["device"] == "cpu"


def test_sequential_offload_keeps_no_mllm_weight_resident_between_calls(tiny_model, tiny_pipe, one_thread):
    # SDXL's sequential offload is diffusers' own and needs an accelerator (accelerate re-wraps the weights
    # for "cpu:0" in a way that fails on a CPU); the MLLM side is EasyRef's, tested here.
    pipe = EasyRefPipeline.from_pretrained(tiny_model, device="cpu", torch_dtype="float32", load_base=False)
    pipe.enable_sequential_cpu_offload(device="cpu")
    tokens = pipe.encode_references(REFS, "a cat")
    assert torch.equal(tokens, tiny_pipe.encode_references(REFS, "a cat"))
    assert {param.device.type for param in pipe.encoder.mllm.parameters()} == {"meta"}
    head = [param for module in pipe.encoder.head_modules().values() for param in module.parameters()]
    assert {param.device.type for param in head} == {"cpu"}  # EasyRef's small head stays on the device


def test_offload_is_refused_on_the_cpu_and_after_placement_with_one_line(tiny_model, tmp_path, capsys):
    with pytest.raises(InvalidArgumentError, match="offload must be one of model, sequential"):
        EasyRefPipeline.from_pretrained(tmp_path / "no-such-model", offload="layers")
    with pytest.raises(InvalidArgumentError, match="device is the CPU"):
        EasyRefPipeline.from_pretrained(tiny_model, device="cpu", offload="model")
    pipe = EasyRefPipeline.from_pretrained(tiny_model, device="cpu", load_base=False)
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(InvalidArgumentError, match="already enabled"):
        pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(InvalidArgumentError, match="offloads its models"):
        pipe.to("cpu")
    ref = tmp_path / "ref.png"
    REFS[0].save(ref)
    code = main(["generate", "--model", str(tiny_model), "--ref", str(ref), "--prompt", "a cat", "--output",
                 str(tmp_path / "out.png"), "--device", "cpu", "--offload", "model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--offload model" in err[0] and "CPU" in err[0]
    assert not (tmp_path / "out.png").exists()
