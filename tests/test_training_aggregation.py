"""Training each aggregation of paper Table 5: the trainer computes what inference computes."""

from __future__ import annotations

import json

import pytest
import torch

from easyref.config import EasyRefConfig
from easyref.training.data import Collator, Sample
from easyref.training.loop import TrainingModel
from easyref.training.options import Augmentations, TrainOptions

from conftest import random_image

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _samples(groups, captions):
    return [Sample(references=group, caption=caption, pixels=torch.zeros(3, 64, 64), time_ids=(64, 64, 0, 0, 64, 64),
                   record=i, skipped=0, dropped_references=0)
            for i, (group, caption) in enumerate(zip(groups, captions, strict=True))]


@pytest.mark.parametrize("aggregation", ["tokens", "average", "concat"])
def test_batched_training_tokens_equal_each_group_encoded_alone(tiny_pipe, aggregation):
    groups = [[random_image(64, 64, 1), random_image(80, 48, 2), random_image(64, 64, 3)], [random_image(56, 90, 4)]]
    captions = ["a red cat", "a dog"]
    tiny_pipe.set_aggregation(aggregation)
    try:
        encoder = tiny_pipe.encoder
        model = TrainingModel(encoder, tiny_pipe.base.unet, train_mllm=False)
        batch = Collator(encoder.processor)(_samples(groups, captions))
        with torch.no_grad():
            batched = model.reference_tokens(batch["mllm"])
            if aggregation == "average":  # independent: each reference alone, mean of head outputs, then projection
                alone = []
                for group, caption in zip(groups, captions, strict=True):
                    states = [encoder.head(encoder.backbone(**(inputs := encoder.processor([[im]], [caption]))),
                                           inputs["attention_mask"]) for im in group]
                    alone.append(encoder.projection(torch.cat(states).mean(0, keepdim=True)))
            else:
                alone = [encoder.encode([group], [caption]) for group, caption in zip(groups, captions, strict=True)]
        rows = batched if isinstance(batched, list) else list(batched.split(1))
        assert len(rows) == 2
        for got, want in zip(rows, alone, strict=True):
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-5)
        if aggregation == "concat":  # one token per merged image patch: lengths follow the groups
            assert rows[0].shape[1] != rows[1].shape[1]
    finally:
        tiny_pipe.set_aggregation("tokens")


@pytest.mark.parametrize("aggregation", ["average", "concat"])
def test_a_variant_trains_and_saves_its_aggregation(tiny_model, tmp_path, aggregation):
    from easyref.training.loop import train

    for i in range(3):
        random_image(64, 64, i).save(tmp_path / f"{i}.png")
    data = tmp_path / "groups.json"
    data.write_text(json.dumps([{"image_file": ["0.png", "1.png"], "text": ["a photo"], "target": "2.png"}] * 4))
    adapter = train(TrainOptions(stage="multi", data=data, output=tmp_path / "run", model=str(tiny_model),
                                 init=tiny_model / "adapter", aggregation=aggregation, max_steps=2, batch_size=2,
                                 resolution=64, augment=Augmentations(resolution=64), lora_rank=4, num_workers=0,
                                 progress=False, log_steps=1, learning_rate=1e-3))
    assert EasyRefConfig.load(adapter).aggregation == aggregation
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


def test_unknown_aggregation_is_refused():
    from easyref.errors import InvalidArgumentError

    options = TrainOptions(stage="align", data="d.json", output="o", model="m", aggregation="median")
    with pytest.raises(InvalidArgumentError, match="--aggregation must be one of tokens, average, concat"):
        options.check()
