"""``--model official``: the authors' release found in the Hugging Face cache, converted once, reused; offline
it names what is missing. The cache is filled with tiny models in the release's layout (nothing downloads)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from easyref import official, release
from easyref.config import EasyRefConfig
from easyref.errors import HubUnavailableError, ModelFormatError
from easyref.official import export_official_layout
from easyref.pipeline import EasyRefPipeline
from easyref.weights import ADAPTER_WEIGHTS

from conftest import hub_snapshot, random_image


@pytest.fixture
def hub_cache(tiny_model, tiny_pipe, tmp_path, monkeypatch):
    """An offline hub cache holding SDXL, Qwen2-VL and the release, all three the tiny model's parts."""
    cache = tmp_path / "hub"
    hub_snapshot(cache, release.RELEASE_BASE, {"": tiny_model / "base"})
    hub_snapshot(cache, release.RELEASE_MLLM, {"": tiny_model / "mllm"})
    save_file(export_official_layout(tiny_pipe), str(tmp_path / "easyref.safetensors"))
    hub_snapshot(cache, release.RELEASE_REPO, {"README.md": tiny_model / "adapter" / "config.json",
                                         "easyref.safetensors": tmp_path / "easyref.safetensors"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _image(pipe) -> np.ndarray:
    result = pipe([random_image(48, 48, 1)], "a cat", seed=1, num_inference_steps=2, height=64, width=64,
                  progress=False)
    return np.asarray(result.images[0], dtype=float)


def test_official_loads_from_the_cache_converted_once_and_generates_as_the_model_it_holds(
        hub_cache, tiny_pipe, tiny_model, monkeypatch):
    pipe = EasyRefPipeline.from_pretrained("official", device="cpu", torch_dtype="float32")
    converted = hub_cache / release.CONVERTED_FOLDER
    assert [path.name for path in converted.iterdir()] == [Path(pipe.sources["adapter"]).name]
    # the release's weights, run as the release computes (a causal final layer; the tiny model's is bidirectional)
    # and at its reference size (336 px; the tiny model reads 56)
    assert pipe.config == dataclasses.replace(tiny_pipe.config, reference_attention="causal",
                                              cond_image_size=EasyRefConfig.cond_image_size)
    ours, theirs = (load_file(Path(folder) / ADAPTER_WEIGHTS) for folder in (pipe.sources["adapter"],
                                                                              tiny_model / "adapter"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert _image(pipe).shape == (64, 64, 3)

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(official, "import_official", must_not_convert)
    again = EasyRefPipeline.from_pretrained("official", device="cpu", torch_dtype="float32")
    assert again.sources["adapter"] == pipe.sources["adapter"]


def test_offline_without_a_part_names_it(hub_cache):
    shutil.rmtree(hub_cache / f"models--{release.RELEASE_BASE.replace('/', '--')}")
    with pytest.raises(HubUnavailableError, match=r"stabilityai/stable-diffusion-xl-base-1.0.*HF_HUB_OFFLINE"):
        EasyRefPipeline.from_pretrained("official")
    shutil.rmtree(hub_cache / f"models--{release.RELEASE_REPO.replace('/', '--')}")
    with pytest.raises(HubUnavailableError, match=r"zongzhuofan/EasyRef is not in the Hugging Face cache"):
        release.release_checkpoint()


def test_a_release_with_several_weights_files_asks_which(hub_cache, tmp_path):
    snapshot = next((hub_cache / f"models--{release.RELEASE_REPO.replace('/', '--')}").glob("snapshots/*"))
    shutil.copy(snapshot / "easyref.safetensors", snapshot / "older.safetensors")
    with pytest.raises(ModelFormatError, match="several weights files .*easyref.safetensors, older.safetensors"):
        release.release_checkpoint()


def test_an_explicit_part_replaces_the_releases(hub_cache, tiny_model):
    pipe = EasyRefPipeline.from_pretrained("official", adapter=tiny_model / "adapter", device="cpu",
                                           torch_dtype="float32")
    assert pipe.sources["adapter"] == str(tiny_model / "adapter")
    assert not (hub_cache / release.CONVERTED_FOLDER).exists()  # nothing fetched or converted for it


def test_a_hub_download_fetches_only_the_pipelines_parts_and_says_how_large(tmp_path, monkeypatch, caplog):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from easyref.hub import resolve

    index = tmp_path / "model_index.json"
    index.write_text('{"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"], '
                     '"tokenizer": ["transformers", "CLIPTokenizer"], "image_encoder": [null, null]}')
    sizes = {"model_index.json": 10, "unet/config.json": 10, "unet/diffusion_pytorch_model.safetensors": 5 * 10**9,
             "unet/diffusion_pytorch_model.fp16.safetensors": 2 * 10**9, "tokenizer/vocab.json": 10,
             "tokenizer/merges.txt": 10, "sd_xl_base_1.0.safetensors": 7 * 10**9,
             "vae_1_0/diffusion_pytorch_model.safetensors": 10**8, "text_encoder/model.onnx": 10**9}
    asked = {}

    def snapshot(repo, local_files_only=False, **kwargs):
        if local_files_only:
            raise FileNotFoundError("not cached")
        asked.update(kwargs)
        return str(tmp_path)

    info = type("Info", (), {"siblings": [type("Sibling", (), {"rfilename": name, "size": size})()
                                          for name, size in sizes.items()]})()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kwargs: str(index))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, files_metadata: info)
    with caplog.at_level("WARNING", logger="easyref.hub"):
        assert resolve("owner/sdxl", "base model", "pipeline") == tmp_path
    fetched = set(filter_repo_objects(list(sizes), allow_patterns=asked["allow_patterns"],
                                      ignore_patterns=asked["ignore_patterns"]))
    assert fetched == {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                       "tokenizer/vocab.json", "tokenizer/merges.txt"}
    assert "downloading base model owner/sdxl (5.0 GB)" in caplog.text
