"""The benchmark's methods on tiny models: right images, averaging that is really an average, no leaks."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from bench_helpers import write_manifest
from easyref.bench.generation_commands import add_run_commands
from easyref.bench.manifest import load_manifest
from easyref.bench.methods import METHODS, IPAdapterMethod, make_method
from easyref.errors import InvalidArgumentError
from easyref.ip_adapter_format import WEIGHT_NAME
from easyref.tiny import write_tiny_ip_adapter

from conftest import fast_cpu_maths

FAST = ["--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "float32",
        "--lora-steps", "2", "--lora-resolution", "64"]


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu_maths():
    with fast_cpu_maths():
        yield


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("bench"), [3, 2])


@pytest.fixture(scope="module")
def groups(bench):
    return load_manifest(bench)


@pytest.fixture(scope="module")
def tiny_ip_adapter(tiny_model, tmp_path_factory):
    return write_tiny_ip_adapter(tmp_path_factory.mktemp("ip") / "ip-adapter", tiny_model / "base")


@pytest.fixture(scope="module")
def options(tiny_model, tiny_ip_adapter, bench, tmp_path_factory):
    """Parse a ``run`` command line (so the tests use the CLI's own defaults) into method options."""
    parser = argparse.ArgumentParser()
    add_run_commands(parser.add_subparsers())
    output = tmp_path_factory.mktemp("out")

    def parse(*extra: str) -> argparse.Namespace:
        return parser.parse_args(["run", "--bench", str(bench), "--output", str(output), "--model", str(tiny_model),
                                  "--ip-adapter", str(tiny_ip_adapter), *FAST, *extra])

    return parse


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_generates_the_asked_images(name, options, groups):
    method = make_method(name, options())
    group = groups[0]
    method.prepare(group, seed=5)
    images = method.generate(group, seed=5, num_images=2)
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    assert not np.array_equal(_pixels(images[0]), _pixels(images[1]))  # two draws, not one image twice
    settings = method.settings()
    assert settings["steps"] == 2 and settings["dtype"] == "float32"
    assert method.tunes == (name == "lora")


def test_ip_adapter_feeds_the_mean_of_per_image_embeddings(options, groups, tiny_ip_adapter):
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    from easyref.images import load_image

    method = make_method("ip-adapter", options())
    images = [load_image(path) for path in groups[0].references]
    # Independently: each reference through CLIP on its own, then the plain mean.
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_ip_adapter / "image_encoder")
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        each = [encoder(**processor(image, return_tensors="pt")).image_embeds[0] for image in images]
    expected = torch.stack(each).mean(0)
    assert not torch.allclose(each[0], expected, atol=1e-3)  # the references really differ

    (embeds,) = method.group_embeds(images)
    assert embeds.shape == (2, 1, 32)  # unconditional half first, one averaged image per half
    torch.testing.assert_close(embeds[1, 0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeds[0, 0], torch.zeros(32))

    # generate() conditions on exactly that average.
    generated = method.generate(groups[0], seed=3, num_images=1)[0]
    direct = method.pipe("a photo number 0", generator=torch.Generator("cpu").manual_seed(3), num_inference_steps=2,
                         height=64, width=64, ip_adapter_image_embeds=[torch.stack([torch.zeros(32), expected])
                                                                       .unsqueeze(1)]).images[0]
    assert np.abs(_pixels(generated) - _pixels(direct)).max() <= 1


def test_ip_adapter_loads_from_the_weight_file_itself(tiny_model, tiny_ip_adapter):
    pipe = IPAdapterMethod.load(tiny_model / "base", tiny_ip_adapter / WEIGHT_NAME, device="cpu",
                                torch_dtype="float32")
    assert len(pipe.unet.encoder_hid_proj.image_projection_layers) == 1


def test_methods_share_seeding_easyref_at_scale_zero_is_text_only(options, groups):
    easyref = make_method("easyref", options("--scale", "0"))
    easyref.pipe.set_config(negative_prompt="")  # the text-only baseline has no negative text either
    text_only = make_method("text-only", options())
    a = easyref.generate(groups[1], seed=11, num_images=1)[0]
    b = text_only.generate(groups[1], seed=11, num_images=1)[0]
    assert np.array_equal(_pixels(a), _pixels(b))


def test_aggregation_override_reaches_the_encoder(options, groups):
    tokens = make_method("easyref", options("--aggregation", "tokens"))
    average = make_method("easyref", options("--aggregation", "average"))
    assert average.settings()["aggregation"] == "average"
    assert average.pipe.encoder.config.aggregation == "average"
    refs = list(groups[0].references)
    assert not torch.allclose(tokens.pipe.encode_references(refs, "x"), average.pipe.encode_references(refs, "x"))
    concat = make_method("easyref", options("--aggregation", "concat"))  # as many tokens as image patches
    assert concat.generate(groups[0], seed=1, num_images=1)[0].size == (64, 64)


def test_lora_is_tuned_per_group_and_never_leaks(options, groups):
    method = make_method("lora", options("--lora-lr", "0.05"))
    first, second = groups
    with pytest.raises(RuntimeError, match="prepared"):
        method.generate(first, seed=1, num_images=1)
    method.prepare(first, seed=1)
    before = method.generate(first, seed=1, num_images=1)[0]
    method.prepare(second, seed=2)
    method.generate(second, seed=2, num_images=1)
    method.prepare(first, seed=1)
    after = method.generate(first, seed=1, num_images=1)[0]
    assert np.array_equal(_pixels(before), _pixels(after))
    assert list(method.pipe.unet.peft_config) == ["bench-lora"]  # one LoRA at a time

    untrained = make_method("lora", options("--lora-lr", "0"))  # LoRA B starts at zero: no effect
    untrained.prepare(first, seed=1)
    plain = make_method("text-only", options()).generate(first, seed=1, num_images=1)[0]
    assert np.array_equal(_pixels(untrained.generate(first, seed=1, num_images=1)[0]), _pixels(plain))
    assert not np.array_equal(_pixels(before), _pixels(plain))  # training changed the model


def test_bad_method_options_fail_before_loading(options, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("easyref.bench.methods.load_plain_sdxl", no_loading)
    without_ip_adapter = options()
    without_ip_adapter.ip_adapter = None
    with pytest.raises(InvalidArgumentError, match="needs --ip-adapter"):
        make_method("ip-adapter", without_ip_adapter)
    with pytest.raises(InvalidArgumentError, match="rank"):
        make_method("lora", options("--lora-rank", "0"))
    with pytest.raises(InvalidArgumentError, match="unknown method"):
        make_method("dreambooth", options())
