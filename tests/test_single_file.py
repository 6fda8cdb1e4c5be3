"""A single-file SDXL base (a finetune as model sites share it): loaded through diffusers' ``from_single_file``
with the configuration of a diffusers folder or the cached SDXL base, nothing downloaded.

The file is written in the test from a tiny pipeline by ``ldm_layout`` (the original key names, written by
hand), so every check compares against the pipeline it was made from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from easyref import release
from easyref.errors import HubUnavailableError, InvalidArgumentError, ModelFormatError
from easyref.hub import resolve
from easyref.pipeline import EasyRefPipeline
from easyref.tiny import TINY_COND_IMAGE_SIZE, write_tiny_base, write_tiny_mllm
from easyref.weights import save_adapter

from conftest import hub_snapshot, random_image
from ldm_layout import sdxl_to_ldm

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny EasyRef model whose SDXL text encoders differ in width (as SDXL's 768 and 1280 do: the single-file
    loader tells them apart by width), plus ``base.safetensors``: its base in the original layout."""
    folder = tmp_path_factory.mktemp("single") / "model"
    write_tiny_base(folder / "base", width_2=48)
    write_tiny_mllm(folder / "mllm")
    torch.manual_seed(0)
    pipe = EasyRefPipeline.create(folder / "base", folder / "mllm", cond_image_size=TINY_COND_IMAGE_SIZE)
    save_adapter(folder / "adapter", pipe.config, pipe.encoder, pipe.base.unet)
    save_file(sdxl_to_ldm(pipe.base), str(folder / "base.safetensors"))
    return folder


def _state(pipe, name: str) -> dict[str, torch.Tensor]:
    return getattr(pipe, name).state_dict()


def _config(module) -> dict:
    """A diffusers model's config (a dict) or a transformers model's (an object), without where it was read from."""
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    return {key: value for key, value in config.items() if key not in ("_name_or_path", "_diffusers_version")}


def test_every_weight_and_config_comes_back(model: Path) -> None:
    folder = EasyRefPipeline.load_base(model / "base")
    single = EasyRefPipeline.load_base(model / "base.safetensors", base_config=model / "base")
    for name in COMPONENTS:
        ours, theirs = _state(single, name), _state(folder, name)
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
        assert _config(getattr(single, name)) == _config(getattr(folder, name)), name
    assert single.scheduler.config == folder.scheduler.config
    assert single.tokenizer_2("a cat").input_ids == folder.tokenizer_2("a cat").input_ids


def _image(pipe: EasyRefPipeline) -> np.ndarray:
    result = pipe([random_image(48, 48, 1), random_image(40, 56, 2)], "a cat", seed=3, num_inference_steps=2,
                  height=64, width=64, progress=False)
    return np.asarray(result.images[0], dtype=float)


def test_easyref_on_a_single_file_base_generates_as_on_its_folder(model: Path, one_thread) -> None:
    parts = {"mllm": model / "mllm", "adapter": model / "adapter", "device": "cpu", "torch_dtype": "float32"}
    single = EasyRefPipeline.from_pretrained(base=model / "base.safetensors", base_config=model / "base", **parts)
    folder = EasyRefPipeline.from_pretrained(base=model / "base", **parts)
    np.testing.assert_array_equal(_image(single), _image(folder))
    assert single.sources["base_config"] == str(model / "base")
    assert "base_config" not in folder.sources


def test_the_default_configuration_is_sdxl_base_from_the_cache(model: Path, tmp_path: Path, monkeypatch) -> None:
    """Only SDXL base's configs and tokenizers are cached (no weights): enough for a single file, offline."""
    base = model / "base"
    configs = {path.relative_to(base).as_posix(): path for path in base.rglob("*")
               if path.is_file() and path.suffix in (".json", ".txt")}
    hub_snapshot(tmp_path / "hub", release.RELEASE_BASE, configs)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = EasyRefPipeline.from_pretrained(base=model / "base.safetensors", mllm=model / "mllm",
                                           adapter=model / "adapter", device="cpu", torch_dtype="float32")
    assert pipe.sources["base_config"] == release.RELEASE_BASE
    assert torch.equal(pipe.base.unet.conv_in.weight, EasyRefPipeline.load_base(base).unet.conv_in.weight)
    # The configs-only snapshot does not pass for the whole base: offline, the missing weights are named.
    with pytest.raises(HubUnavailableError, match=f"{release.RELEASE_BASE}.*HF_HUB_OFFLINE"):
        resolve(release.RELEASE_BASE, "base model", "pipeline")


def test_offline_without_a_cached_configuration_names_it(model: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match=f"configuration {release.RELEASE_BASE} .*HF_HUB_OFFLINE"):
        EasyRefPipeline.load_base(model / "base.safetensors")


def _checkpoint(model: Path, tmp_path: Path, change) -> Path:
    state = sdxl_to_ldm(EasyRefPipeline.load_base(model / "base"))
    change(state)
    path = tmp_path / "changed.safetensors"
    save_file(state, str(path))
    return path


def test_a_missing_weight_is_refused(model: Path, tmp_path: Path) -> None:
    path = _checkpoint(model, tmp_path, lambda state: state.pop("conditioner.embedders.1.model.text_projection"))
    with pytest.raises(ModelFormatError, match="lacks weights of the text_encoder_2"):
        EasyRefPipeline.load_base(path, base_config=model / "base")


def test_a_weight_of_the_wrong_shape_is_refused(model: Path, tmp_path: Path) -> None:
    def widen(state):
        state["model.diffusion_model.out.2.weight"] = torch.zeros(8, 32, 3, 3)

    with pytest.raises(ModelFormatError, match=r"does not load with the configuration of .*base"):
        EasyRefPipeline.load_base(_checkpoint(model, tmp_path, widen), base_config=model / "base")


def test_files_that_are_not_sdxl_checkpoints_are_refused(model: Path, tmp_path: Path) -> None:
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ModelFormatError, match=r"must be a \.safetensors file"):
        EasyRefPipeline.load_base(pickle)
    diffusers_unet = next((model / "base" / "unet").glob("*.safetensors"))
    with pytest.raises(ModelFormatError, match="not an SDXL base checkpoint in the original single-file layout"):
        EasyRefPipeline.load_base(diffusers_unet, base_config=model / "base")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFormatError, match="not a readable safetensors file"):
        EasyRefPipeline.load_base(garbage, base_config=model / "base")
    with pytest.raises(ModelFormatError, match="is not a diffusers pipeline folder"):
        EasyRefPipeline.load_base(model / "base.safetensors", base_config=model / "mllm")


def test_a_missing_file_and_a_base_that_is_not_sdxl_base_are_named(model: Path, tmp_path: Path) -> None:
    for missing in (tmp_path / "nothere.safetensors", tmp_path / "models" / "nothere.safetensors"):
        with pytest.raises(ModelFormatError, match="nothere.safetensors: no such file"):
            EasyRefPipeline.load_base(missing, base_config=model / "base")
    without_openclip = _checkpoint(model, tmp_path, lambda state: [state.pop(key) for key in list(state)
                                                                   if key.startswith("conditioner.embedders.1.")])
    with pytest.raises(ModelFormatError, match="not an SDXL base checkpoint .*refiner"):
        EasyRefPipeline.load_base(without_openclip, base_config=model / "base")


def test_an_upper_case_suffix_is_named_not_taken_for_a_pickle(model: Path, tmp_path: Path) -> None:
    """diffusers reads any name not ending in ".safetensors" as a pickle: the rename is asked for instead."""
    upper = tmp_path / "BASE.SAFETENSORS"
    upper.write_bytes((model / "base.safetensors").read_bytes())
    with pytest.raises(ModelFormatError, match=r"must be named \*\.safetensors, in lower case"):
        EasyRefPipeline.load_base(upper, base_config=model / "base")


def test_a_configuration_without_a_single_file_base_is_refused_before_anything_loads(model: Path,
                                                                                    monkeypatch) -> None:
    from easyref import pipeline
    from easyref.training.options import TrainOptions

    def must_not_resolve(*args, **kwargs):
        raise AssertionError("a part was resolved before the refusal")

    monkeypatch.setattr(pipeline, "resolve", must_not_resolve)
    with pytest.raises(InvalidArgumentError, match="describes a single-file base, but the base .* is a folder"):
        EasyRefPipeline.load_base(model / "base", base_config=model / "base")
    with pytest.raises(InvalidArgumentError, match="but no single-file base is given"):
        EasyRefPipeline.from_pretrained(model, base_config=model / "base", device="cpu")
    with pytest.raises(InvalidArgumentError, match="describes a single-file base"):
        TrainOptions(stage="align", data=Path("d.json"), output=Path("out"), model=str(model),
                     base_config=str(model / "base")).check()


def test_generate_takes_a_single_file_base_and_records_its_configuration(model: Path, tmp_path: Path) -> None:
    reference = tmp_path / "ref.png"
    random_image(48, 48, 1).save(reference)
    output = tmp_path / "out.png"
    command = [sys.executable, "-m", "easyref", "generate", "--base", str(model / "base.safetensors"),
               "--base-config", str(model / "base"), "--mllm", str(model / "mllm"), "--adapter",
               str(model / "adapter"), "--ref", str(reference), "--prompt", "a cat", "--steps", "2", "--height",
               "64", "--width", "64", "--device", "cpu", "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sidecar = json.loads(output.with_suffix(".json").read_text())
    assert sidecar["settings"]["sources"]["base"] == str(model / "base.safetensors")
    assert sidecar["settings"]["sources"]["base_config"] == str(model / "base")


def test_the_release_on_a_single_file_base_needs_only_sdxl_base_configs(model: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """``--model official --base FILE``: the release's checkpoint is converted against the file, and SDXL base
    contributes its configs alone (its weights are not in the cache, and offline nothing is fetched)."""
    from easyref.official import export_official_layout

    source = EasyRefPipeline.from_pretrained(model, device="cpu", torch_dtype="float32")
    save_file(export_official_layout(source), str(tmp_path / "easyref.safetensors"))
    cache = tmp_path / "hub"
    base = model / "base"
    hub_snapshot(cache, release.RELEASE_BASE, {path.relative_to(base).as_posix(): path for path in base.rglob("*")
                                               if path.is_file() and path.suffix in (".json", ".txt")})
    hub_snapshot(cache, release.RELEASE_MLLM, {"": model / "mllm"})
    empty = tmp_path / "empty"
    hub_snapshot(empty, release.RELEASE_MLLM, {"": model / "mllm"})
    hub_snapshot(empty, release.RELEASE_REPO, {"easyref.safetensors": tmp_path / "easyref.safetensors"})
    hub_snapshot(cache, release.RELEASE_REPO, {"easyref.safetensors": tmp_path / "easyref.safetensors"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = EasyRefPipeline.from_pretrained("official", base=model / "base.safetensors", device="cpu",
                                           torch_dtype="float32")
    assert pipe.sources["base"] == str(model / "base.safetensors")
    assert pipe.sources["base_config"] == release.RELEASE_BASE
    assert torch.equal(pipe.encoder.final.reference_tokens, source.encoder.final.reference_tokens)
    assert torch.equal(pipe.base.unet.conv_in.weight, source.base.unet.conv_in.weight)
    # With a local configuration, SDXL base need not be in the cache at all (conversion included).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    local = EasyRefPipeline.from_pretrained("official", base=model / "base.safetensors", base_config=base,
                                            device="cpu", torch_dtype="float32")
    assert local.sources["base_config"] == str(base)
    assert torch.equal(local.encoder.final.reference_tokens, source.encoder.final.reference_tokens)
