"""ShapesWorld's MLLM: answers supervised on the assistant turn only, learning on a tiny budget, and a
folder that loads back to the same model and plugs into EasyRef as its Qwen2-VL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from easyref.errors import InvalidArgumentError
from easyref.pipeline import EasyRefPipeline
from easyref.prompting import IMAGE_PAD, ReferenceProcessor
from easyref.shapes import mllm
from easyref.shapes.vocab import qwen_tokenizer
from easyref.tiny import write_tiny_base
from easyref.training.steps import LoopSettings

from conftest import fast_cpu_maths

SEED = 2
# A few seconds of training: the smallest model that still has EasyRef's shape (a last layer to copy).
TINY = mllm.MllmSettings(vision_embed_dim=32, vision_depth=1, vision_heads=2, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2, steps=24, vision_fraction=0.25,
                         vision_batch=8, group_rows=3, caption_rows=3, learning_rate=3e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def processor():
    return mllm.question_processor(qwen_tokenizer(), mllm.image_processor())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pretrained folder from a short run, evaluated on a handful of groups."""
    folder = tmp_path_factory.mktemp("shapes-pretrained")
    with fast_cpu_maths():
        summary = mllm.pretrain_mllm(folder / "mllm", seed=SEED, progress=False, settings=TINY, eval_groups=3)
    return folder / "mllm", summary


def _examples() -> list[mllm.Example]:
    return [mllm.group_example("held-in", 0, 3, SEED), mllm.group_example("held-in", 1, 1, SEED),
            mllm.caption_example(np.random.default_rng(SEED))]


def test_labels_cover_exactly_the_assistant_answer(processor):
    tok = processor.tokenizer
    examples = _examples()
    batch = mllm.teacher_forcing_batch(processor, examples)
    image_pad = tok.convert_tokens_to_ids(IMAGE_PAD)
    for row, example in enumerate(examples):
        keep = batch["attention_mask"][row].bool()
        ids, labels = batch["input_ids"][row][keep].tolist(), batch["labels"][row][keep].tolist()
        # The whole conversation as the chat template renders it, each 64x64 image as 16 placeholders.
        user = {"role": "user", "content": [{"type": "image"}] * len(example.images)
                + [{"type": "text", "text": example.question}]}
        turns = [user, {"role": "assistant", "content": example.answer}]
        text = tok.apply_chat_template(turns, tokenize=False).replace(IMAGE_PAD, IMAGE_PAD * 16)
        assert text.endswith("<|im_end|>\n")
        assert ids == tok(text.removesuffix("\n"), add_special_tokens=False)["input_ids"]
        supervised = [i for i, label in enumerate(labels) if label != mllm.IGNORE]
        answer = tok(example.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert supervised == list(range(len(ids) - len(answer), len(ids)))
        assert [labels[i] for i in supervised] == answer
        assert ids.count(image_pad) == 16 * len(example.images)
    # Padding never carries a label, and the image placeholders are what M-RoPE sees as images.
    assert (batch["labels"][batch["attention_mask"] == 0] == mllm.IGNORE).all()
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == image_pad)


def test_batches_are_a_function_of_the_step(processor):
    first = mllm.teacher_forcing_batch(processor, mllm.training_examples(5, SEED, TINY))
    again = mllm.teacher_forcing_batch(processor, mllm.training_examples(5, SEED, TINY))
    other = mllm.teacher_forcing_batch(processor, mllm.training_examples(6, SEED, TINY))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["pixel_values"], other["pixel_values"])


def test_short_training_lowers_the_answer_loss(trained, processor, one_thread):
    folder, summary = trained
    batch = mllm.teacher_forcing_batch(processor, _examples())
    untrained = mllm.build_model(processor.tokenizer, TINY, SEED).eval()
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        before, after = mllm.answer_loss(untrained, batch), mllm.answer_loss(model, batch)
    assert after < 0.7 * before
    assert summary["steps"] == TINY.steps and summary["vision_steps"] == 6
    quality = summary["quality"]
    assert set(quality["held_in"]) == {"1", "2", "4", "8"}
    assert all(0.0 <= value <= 1.0 for value in quality["held_in"].values())


def test_save_load_round_trip_gives_identical_logits(tmp_path, processor, one_thread):
    model = mllm.build_model(processor.tokenizer, TINY, SEED).eval()
    mllm.save_mllm(model, processor, tmp_path / "mllm")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "mllm").eval()
    # The saved tokenizer and image processor rebuild the very same inputs.
    reloaded = ReferenceProcessor.from_pretrained(tmp_path / "mllm", processor.config)
    batch = mllm.teacher_forcing_batch(processor, _examples())
    again = mllm.teacher_forcing_batch(reloaded, _examples())
    assert all(torch.equal(batch[key], again[key]) for key in batch)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert loaded.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_folder_works_as_easyref_mllm(trained, tmp_path, one_thread):
    folder, _ = trained
    write_tiny_base(tmp_path / "base")
    pipe = EasyRefPipeline.create(tmp_path / "base", folder, cond_image_size=mllm.COND_IMAGE_SIZE)
    group = mllm.group_example("held-in", 0, 4, SEED)
    image_pad = pipe.encoder.processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    inputs = pipe.encoder.processor([group.images[:1]], ["a large object"])
    assert group.images[0].size == (64, 64)
    assert int((inputs["input_ids"] == image_pad).sum()) == 16
    embeds = pipe.encode_references(list(group.images), "a large object at the top")
    assert embeds.shape == (1, pipe.config.num_reference_tokens, pipe.config.cross_attention_dim)
    assert torch.isfinite(embeds).all()


def test_each_phase_gets_its_own_learning_rate_schedule():
    settings = LoopSettings(steps=100, learning_rate=1.0, warmup_steps=5, restarts=(40,))
    plain = LoopSettings(steps=60, learning_rate=1.0, warmup_steps=5)
    assert settings.rate_factor(39) == pytest.approx(0.1, abs=0.01)
    assert [settings.rate_factor(40 + step) for step in range(60)] == [plain.rate_factor(step) for step in range(60)]
    with pytest.raises(InvalidArgumentError):
        LoopSettings(steps=10, learning_rate=1.0, restarts=(10,))
