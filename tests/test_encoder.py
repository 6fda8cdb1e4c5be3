"""Properties of the reference encoder that the method depends on."""

from __future__ import annotations

import copy

import pytest
import torch

from easyref.errors import ShapeMismatchError

from conftest import random_image


@pytest.fixture
def encoder(tiny_pipe):
    """A private copy, so tests may change the config and weights freely."""
    return copy.deepcopy(tiny_pipe.encoder).eval()


def _encode(encoder, images, prompt="a photo"):
    with torch.no_grad():
        return encoder.encode([images], [prompt])


def test_output_shape_independent_of_reference_count(encoder):
    config = encoder.config
    for count in (1, 2, 5):
        images = [random_image(40 + 17 * i, 90 - 9 * i, i) for i in range(count)]
        out = _encode(encoder, images)
        assert out.shape == (1, config.num_reference_tokens, config.cross_attention_dim)


def _head_after_changing_last_token(encoder):
    images = [random_image(64, 64, 5), random_image(80, 40, 6)]
    inputs = encoder.processor([images], ["x"])
    with torch.no_grad():
        prefix = encoder.backbone(**inputs)
        before = encoder.head(prefix, inputs["attention_mask"])
        encoder.final.reference_tokens[-1] += 1.0
        after = encoder.head(prefix, inputs["attention_mask"])
    return before, after


def test_bidirectional_reference_tokens_see_later_tokens(encoder):
    encoder.config.reference_attention = "bidirectional"
    before, after = _head_after_changing_last_token(encoder)
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-4


def test_causal_reference_tokens_do_not_see_later_tokens(encoder):
    encoder.config.reference_attention = "causal"
    before, after = _head_after_changing_last_token(encoder)
    torch.testing.assert_close(before[:, :-1], after[:, :-1], rtol=0, atol=1e-6)
    assert (before[:, -1] - after[:, -1]).abs().max() > 1e-4


def test_batched_vision_encoding_equals_per_image_loop(encoder):
    images = [random_image(56, 56, 1), random_image(112, 56, 2), random_image(60, 150, 3)]
    vision = encoder.processor.images(images)
    with torch.no_grad():
        encoder.vision_batching = "batched"
        batched = encoder.encode_images(**vision)
        encoder.vision_batching = "loop"
        looped = encoder.encode_images(**vision)
    assert batched.shape[0] == int(vision["image_grid_thw"].prod(-1).sum()) // 4
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)


def test_padded_batch_rows_equal_rows_alone(encoder):
    groups = [[random_image(64, 64, 1)], [random_image(64, 64, 2), random_image(90, 40, 3)]]
    prompts = ["short", "a much longer prompt with many more words in it"]
    with torch.no_grad():
        together = encoder.encode(groups, prompts)
        alone = [encoder.encode([g], [p]) for g, p in zip(groups, prompts, strict=True)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_average_mode_is_mean_of_single_reference_states(encoder):
    images = [random_image(64, 64, 1), random_image(100, 50, 2)]
    encoder.config.aggregation = "average"
    with torch.no_grad():
        out = _encode(encoder, images)
        states = []
        for image in images:
            inputs = encoder.processor([[image]], ["a photo"])
            states.append(encoder.head(encoder.backbone(**inputs), inputs["attention_mask"]))
        expected = encoder.projection(torch.cat(states).mean(0, keepdim=True))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_concat_mode_returns_every_image_token(encoder):
    images = [random_image(64, 64, 1), random_image(100, 50, 2), random_image(50, 50, 3)]
    encoder.config.aggregation = "concat"
    grid = encoder.processor.images(images)["image_grid_thw"]
    out = _encode(encoder, images)
    assert out.shape == (1, int(grid.prod(-1).sum()) // 4, encoder.config.cross_attention_dim)


def test_prompt_changes_the_encoding(encoder):
    images = [random_image(64, 64, 1)]
    assert (_encode(encoder, images, "a dog") - _encode(encoder, images, "a cat")).abs().max() > 1e-5


def test_too_many_final_layers_is_refused(tiny_pipe):
    from easyref.encoder import ReferenceEncoder

    config = copy.deepcopy(tiny_pipe.config)
    config.num_final_layers = 3
    with pytest.raises(ShapeMismatchError, match="num_final_layers=3"):
        ReferenceEncoder(tiny_pipe.encoder.mllm_for_saving(), tiny_pipe.encoder.processor, config)


def test_two_final_layers(tiny_pipe):
    from easyref.encoder import ReferenceEncoder

    config = copy.deepcopy(tiny_pipe.config)
    config.num_final_layers = 2
    encoder = ReferenceEncoder(tiny_pipe.encoder.mllm_for_saving(), tiny_pipe.encoder.processor, config)
    assert len(encoder.final.layers) == 2
    assert _encode(encoder, [random_image(64, 64, 1)]).shape[1] == config.num_reference_tokens


def _text_model(language_model, layers, norm):
    """A stock transformers text model holding exactly ``layers`` and ``norm`` (copied weights)."""
    config = copy.deepcopy(language_model.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:len(layers)]
    model = type(language_model)(config).eval()
    for mine, theirs in zip(model.layers, layers, strict=True):
        mine.load_state_dict(theirs.state_dict())
    model.norm.load_state_dict(norm.state_dict())
    return model


def test_two_final_layers_match_an_independent_computation(tiny_pipe):
    """K = 2: the backbone is the MLLM's first L-2 layers + its final norm, then the (trained) copy of the
    last 2 layers + norm runs over [prefix ; reference tokens]; recomputed here with transformers' own
    text-model forward (its masks and rotary embeddings), causal reference attention as in the release."""
    from easyref.encoder import ReferenceEncoder

    config = copy.deepcopy(tiny_pipe.config)
    config.num_final_layers, config.reference_attention = 2, "causal"
    encoder = ReferenceEncoder(tiny_pipe.encoder.mllm_for_saving(), tiny_pipe.encoder.processor, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a trained copy differs from the MLLM's own last layers
        for param in encoder.final.parameters():
            param.add_(0.05 * torch.randn_like(param))
    images, prompt = [random_image(64, 64, 1), random_image(84, 56, 2)], "a cat"
    inputs = encoder.processor.rows([images], [prompt])
    lm, ids, mask = encoder.language_model, inputs["input_ids"], inputs["attention_mask"]
    layers = lm.config.num_hidden_layers
    with torch.no_grad():
        image_tokens = encoder.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
        embeds = lm.embed_tokens(ids).masked_scatter((ids == encoder.mllm.config.image_token_id)[..., None],
                                                     image_tokens)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prefix = _text_model(lm, lm.layers[:layers - 2], lm.norm)(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        tokens = encoder.final.reference_tokens[None]
        full_mask = torch.cat([mask, mask.new_ones(1, tokens.shape[1])], dim=1)
        out = _text_model(lm, encoder.final.layers, encoder.final.norm)(
            inputs_embeds=torch.cat([prefix, tokens], dim=1), attention_mask=full_mask,
            position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        expected = encoder.projection(out[:, ids.shape[1]:])
        actual = encoder.encode([images], [prompt])
    assert actual.shape == (1, config.num_reference_tokens, config.cross_attention_dim)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_qwen2_5_vl_is_served_by_the_same_code(tiny_model, tmp_path):
    from easyref.pipeline import EasyRefPipeline
    from easyref.tiny import write_tiny_mllm

    write_tiny_mllm(tmp_path / "mllm25", family="qwen2_5_vl")
    pipe = EasyRefPipeline.create(tiny_model / "base", tmp_path / "mllm25", cond_image_size=56)
    assert type(pipe.encoder.mllm).__name__ == "Qwen2_5_VLModel"
    images = [random_image(64, 90, 1), random_image(120, 60, 2)]
    out = pipe.encode_references(images, "x")
    assert out.shape == (1, pipe.config.num_reference_tokens, pipe.config.cross_attention_dim)
    vision = pipe.encoder.processor.images(images)
    with torch.no_grad():
        pipe.encoder.vision_batching = "batched"
        batched = pipe.encoder.encode_images(**vision)
        pipe.encoder.vision_batching = "loop"
        torch.testing.assert_close(batched, pipe.encoder.encode_images(**vision), rtol=1e-5, atol=1e-5)
