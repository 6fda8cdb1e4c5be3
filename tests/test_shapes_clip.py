"""ShapesWorld's tokenizers, CLIP and DINO: one token per attribute word, learning on a tiny budget, and
folders that the metrics (and diffusers' IP-Adapter image encoder) load back to the very same embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection, Dinov2Model
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from easyref.bench.metrics import MetricModels
from easyref.config import RELEASE_INSTRUCTION
from easyref.shapes import clip, dino, vocab
from easyref.shapes.world import ATTRIBUTES, clean_scene, random_attributes, render
from easyref.tiny import QWEN2_VL_SPECIAL_TOKENS

from conftest import fast_cpu_maths

SEED = 3
EVAL_SCENES = 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CLIP and a DINO trained for a few seconds each, published as a pretrained set would hold them."""
    folder = tmp_path_factory.mktemp("shapes-pretrained")
    with fast_cpu_maths():
        clip_summary = clip.pretrain_clip(folder / "clip", steps=40, seed=SEED, progress=False, families=8,
                                          eval_scenes=EVAL_SCENES)
        dino_summary = dino.pretrain_dino(folder / "dino", steps=15, seed=SEED, progress=False, scenes=16,
                                          eval_scenes=EVAL_SCENES)
    return folder, clip_summary, dino_summary


def _renders(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [render(clean_scene(random_attributes(rng), rng)) for _ in range(count)]


def test_every_attribute_word_is_one_token():
    clip_tokenizer, qwen_tokenizer = vocab.clip_tokenizer(), vocab.qwen_tokenizer()
    words = vocab.attribute_words()
    assert {"top", "left", "striped", "gradient", "teal"} <= set(words)
    for word in words:
        assert clip_tokenizer.tokenize(word) == [word + "</w>"]
        assert qwen_tokenizer.tokenize(" " + word) == ["Ġ" + word]


def test_clip_tokenizer_round_trips_and_pads_as_sdxl():
    tokenizer = vocab.clip_tokenizer()
    caption = random_attributes(np.random.default_rng(1)).caption()
    ids = tokenizer(caption, padding="max_length")["input_ids"]
    assert len(ids) == tokenizer.model_max_length == vocab.CLIP_MAX_LENGTH
    assert ids[0] == tokenizer.bos_token_id and ids[len(caption.split()) + 1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    # Words outside the world still encode, letter by letter, never as an unknown token.
    unseen = tokenizer("Zebra crossing")["input_ids"]
    assert tokenizer.decode(unseen, skip_special_tokens=True) == "zebra crossing"
    assert tokenizer.unk_token_id not in unseen[1:-1]
    second = vocab.clip_tokenizer(pad_token="!")
    assert second.get_vocab() == tokenizer.get_vocab()
    assert second("a red star", padding="max_length")["input_ids"][-1] == second.convert_tokens_to_ids("!")


def test_qwen_tokenizer_keeps_specials_and_chat_template():
    tokenizer = vocab.qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(list(QWEN2_VL_SPECIAL_TOKENS))
    assert len(set(ids)) == len(ids) and max(ids) == len(tokenizer) - 1
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": RELEASE_INSTRUCTION}]}],
        tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 1
    assert tokenizer.decode(encoded) == text
    # Every word of the world, the instruction included, is one token.
    assert len(tokenizer(RELEASE_INSTRUCTION)["input_ids"]) <= len(RELEASE_INSTRUCTION.split()) + 2


def test_tokenizer_training_is_deterministic():
    assert vocab._clip_merges.__wrapped__() == vocab._clip_merges()
    assert vocab._qwen_merges.__wrapped__() == vocab._qwen_merges()


def test_short_training_lowers_losses_and_clip_reads_attributes(trained):
    _, clip_summary, dino_summary = trained
    for summary in (clip_summary, dino_summary):
        assert summary["final_loss"] < summary["first_loss"]
    chance = np.mean([1 / len(values) for values in ATTRIBUTES.values()])
    accuracy = clip_summary["zero_shot_accuracy"]
    assert accuracy["train"]["mean"] > chance + 0.1
    assert accuracy["train"]["per_attribute"]["background"] > 0.5


def test_clip_folder_loads_to_the_same_model(trained, one_thread):
    folder, summary, _ = trained
    models = MetricModels.load(folder / "clip", folder / "dino", device="cpu")
    loaded = CLIPModel.from_pretrained(folder / "clip").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "clip")
    assert tokenizer.get_vocab() == vocab.clip_tokenizer().get_vocab()
    # The published weights are the trained ones: the evaluation reproduces exactly.
    assert clip.evaluate(loaded, tokenizer, SEED, EVAL_SCENES) == summary["zero_shot_accuracy"]
    images = _renders(6)
    pixels = clip.to_pixels(np.stack(images), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    with torch.no_grad():
        expected = F.normalize(loaded.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "clip").eval()
        torch.testing.assert_close(image_encoder(pixel_values=pixels).image_embeds,
                                   loaded.get_image_features(pixel_values=pixels).pooler_output)
        captions = [random_attributes(np.random.default_rng(i)).caption() for i in range(4)]
        texts = F.normalize(loaded.get_text_features(**clip._tokens(tokenizer, captions)).pooler_output, dim=-1)
    torch.testing.assert_close(models.clip_images([Image.fromarray(i) for i in images]), expected,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(models.clip_texts(captions), texts, atol=1e-5, rtol=1e-5)


def test_dino_folder_loads_to_the_same_model(trained, one_thread):
    folder, _, summary = trained
    models = MetricModels.load(folder / "clip", folder / "dino", device="cpu")
    loaded = Dinov2Model.from_pretrained(folder / "dino").eval()
    assert dino.evaluate(loaded, SEED, EVAL_SCENES) == summary["swap_accuracy"]
    images = _renders(6)
    torch.testing.assert_close(models.dino_images([Image.fromarray(i) for i in images]), dino.embed(loaded, images),
                               atol=1e-5, rtol=1e-5)
