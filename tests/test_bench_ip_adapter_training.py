"""The IP-Adapter baseline trainer: diffusers' own adapter, trained, saved in the layout users load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from easyref import ip_adapter_format
from easyref.bench.ip_adapter_training import IPAdapterTraining, train_ip_adapter
from easyref.bench.methods import IPAdapterMethod
from easyref.cli import main
from easyref.errors import InvalidArgumentError
from easyref.tiny import write_tiny_ip_adapter

from conftest import random_image

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def pairs(tmp_path):
    records = []
    for i in range(4):
        random_image(64, 64, i).save(tmp_path / f"{i}.png")
        records.append({"image_file": [f"{i}.png"], "text": [f"photo {i}"], "target": f"{i}.png"})
    records.append({"image_file": ["0.png"], "text": ["a group"], "target": "1.png"})  # not a pair: ignored
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(records))
    return data


def test_fresh_adapter_attends_like_the_text_path(tiny_model):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "base" / "unet")
    state = ip_adapter_format.initial_state(unet, embed_dim=32)
    first_cross = unet.get_submodule(ip_adapter_format._cross_attention_names(unet)[0])
    assert torch.equal(state["ip_adapter.1.to_k_ip.weight"], first_cross.to_k.weight)
    assert state["image_proj.proj.weight"].shape == (ip_adapter_format.TOKENS * unet.config.cross_attention_dim, 32)


def test_training_learns_and_the_result_loads_with_diffusers(tiny_model, pairs, tmp_path):
    encoder = write_tiny_ip_adapter(tmp_path / "ref-ip", tiny_model / "base") / "image_encoder"
    settings = IPAdapterTraining(steps=3, batch_size=2, learning_rate=1e-2, resolution=64)
    folder = train_ip_adapter(tiny_model / "base", encoder, pairs, tmp_path / "run", settings, progress=False)
    trained = load_file(str(folder / ip_adapter_format.WEIGHT_NAME))
    pipe = IPAdapterMethod.load(tiny_model / "base", folder, device="cpu", torch_dtype="float32")
    reloaded = ip_adapter_format.loaded_state(pipe.unet)
    assert trained.keys() == reloaded.keys()
    assert all(torch.equal(trained[key], reloaded[key]) for key in trained)
    fresh = ip_adapter_format.initial_state(pipe.unet, embed_dim=32)  # the base UNet's to_k: what training started from
    assert not torch.equal(trained["ip_adapter.1.to_k_ip.weight"], fresh["ip_adapter.1.to_k_ip.weight"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "work" / "log.jsonl").read_text().splitlines()]
    assert losses and all(loss > 0 for loss in losses)


def test_no_pairs_is_one_clear_error(tiny_model, tmp_path, capsys):
    random_image(64, 64, 0).save(tmp_path / "a.png")
    data = tmp_path / "groups.json"
    data.write_text(json.dumps([{"image_file": ["a.png"], "text": ["x"], "target": "b.png"}]))
    with pytest.raises(InvalidArgumentError, match="holds no image-caption pairs"):
        train_ip_adapter(tiny_model / "base", tmp_path, data, tmp_path / "run", progress=False)
    assert main(["bench", "train-ip-adapter", "--base", str(tiny_model / "base"), "--image-encoder", str(tmp_path),
                 "--data", str(data), "--output", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
