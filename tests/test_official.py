"""Importing the release's checkpoint layout: round trip, release-math parity, bad inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from easyref import adapter as unet_adapter
from easyref.errors import ModelFormatError, OutputPathError, ShapeMismatchError
from easyref.official import (
    convert_official,
    export_official_layout,
    import_official,
    read_official_checkpoint,
)
from easyref.pipeline import EasyRefPipeline
from easyref.tiny import write_tiny_base, write_tiny_mllm
from easyref.weights import adapter_state_dict

PROMPT = "a red fox"
NUM_TOKENS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tiny_base(root / "base")
    write_tiny_mllm(root / "mllm")
    return root


def _randomise(pipe: EasyRefPipeline) -> None:
    """Random EasyRef weights (LoRA B non-zero) and a perturbed ("finetuned") MLLM."""
    gen = torch.Generator().manual_seed(1234)
    unet = pipe.base.unet
    params = [*pipe.encoder.final.parameters(), *pipe.encoder.projection.parameters(),
              *(p for proc in unet_adapter.adapter_processors(unet).values() for p in proc.parameters()),
              *(p for name, p in unet.named_parameters() if "lora_" in name)]
    with torch.no_grad():
        for param in params:
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
        pipe.encoder.final.reference_tokens.copy_(torch.randn(pipe.encoder.final.reference_tokens.shape,
                                                              generator=gen))
        for param in pipe.encoder.mllm.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


@pytest.fixture(scope="module")
def source(models: Path) -> EasyRefPipeline:
    pipe = EasyRefPipeline.create(models / "base", models / "mllm", lora_rank=4,
                                  num_reference_tokens=NUM_TOKENS, reference_attention="causal")
    _randomise(pipe)
    return pipe


@pytest.fixture(scope="module")
def checkpoint(source: EasyRefPipeline) -> dict[str, torch.Tensor]:
    return export_official_layout(source)


@pytest.fixture(scope="module")
def files(checkpoint: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("release")
    save_file(checkpoint, str(root / "easyref.safetensors"))
    torch.save({"module": checkpoint, "global_steps": 10}, root / "mp_rank_00_model_states.pt")
    no_mllm = {key: value for key, value in checkpoint.items() if not key.startswith("multimodal_llm.")}
    save_file(no_mllm, str(root / "no_mllm.safetensors"))
    return {"safetensors": root / "easyref.safetensors", "pt": root / "mp_rank_00_model_states.pt",
            "no_mllm": root / "no_mllm.safetensors"}


def _load(models: Path, adapter: Path) -> EasyRefPipeline:
    return EasyRefPipeline.from_pretrained(base=models / "base", mllm=models / "mllm", adapter=adapter,
                                           device="cpu", torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def imported(models: Path, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> EasyRefPipeline:
    out = import_official(files["safetensors"], tmp_path_factory.mktemp("imported") / "adapter", model=models)
    return _load(models, out)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    gen = torch.Generator().manual_seed(7)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
            for h, w in ((336, 336), (280, 392))]


# -- round trip --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_round_trip_restores_every_weight(kind: str, models: Path, files: dict[str, Path],
                                          source: EasyRefPipeline, tmp_path: Path) -> None:
    out = import_official(files[kind], tmp_path / "adapter", base=models / "base", mllm=models / "mllm")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mllm.safetensors", "model.safetensors"]
    pipe = _load(models, out)
    config = pipe.config
    assert (config.reference_attention, config.aggregation) == ("causal", "tokens")
    assert (config.num_final_layers, config.num_reference_tokens, config.lora_rank) == (1, NUM_TOKENS, 4)
    expected = adapter_state_dict(source.encoder, source.base.unet)
    got = adapter_state_dict(pipe.encoder, pipe.base.unet)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    lora_b = [value for key, value in got.items() if key.startswith("unet_lora.") and "lora_B" in key]
    assert lora_b and all(value.abs().sum() > 0 for value in lora_b)
    expected_mllm, got_mllm = source.encoder.mllm.state_dict(), pipe.encoder.mllm.state_dict()
    assert all(torch.equal(expected_mllm[key], got_mllm[key]) for key in expected_mllm)


def test_export_inverts_import(imported: EasyRefPipeline, checkpoint: dict[str, torch.Tensor]) -> None:
    again = export_official_layout(imported)
    head = "multimodal_llm.lm_head.weight"  # the LM head is never imported (EasyRef does not use it)
    assert again.keys() == checkpoint.keys()
    assert all(torch.equal(again[key], checkpoint[key]) for key in checkpoint if key != head)


def test_finetuned_mllm_weights_change_the_encoding(models: Path, files: dict[str, Path], source: EasyRefPipeline,
                                                    imported: EasyRefPipeline, images, tmp_path: Path) -> None:
    with_mllm = imported.encode_references(images, PROMPT)
    torch.testing.assert_close(with_mllm, source.encode_references(images, PROMPT), rtol=0, atol=1e-5)
    out = import_official(files["no_mllm"], tmp_path / "adapter", model=models)
    assert not (out / "mllm.safetensors").exists()
    without = _load(models, out).encode_references(images, PROMPT)
    assert (with_mllm - without).abs().max() > 1e-3


def test_convert_counts_final_layers(checkpoint: dict[str, torch.Tensor]) -> None:
    state = dict(checkpoint)
    state.update({key.replace("layers.0.", "layers.1."): value for key, value in checkpoint.items()
                  if key.startswith("mllm_final_layer.layers.0.")})
    config, adapter_state, mllm_state = convert_official(state, mllm_hidden_size=32, cross_attention_dim=64)
    assert (config.num_final_layers, config.num_reference_tokens, config.lora_rank) == (2, NUM_TOKENS, 4)
    assert "final.layers.1.mlp.up_proj.weight" in adapter_state
    assert mllm_state is not None and "model.language_model.norm.weight" in mllm_state
    assert "model.visual.merger.ln_q.weight" in mllm_state and not any("lm_head" in key for key in mllm_state)


# -- release-math parity -----------------------------------------------------------------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _decoder_layer(x: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg, start: int) -> torch.Tensor:
    """One Qwen2 decoder layer by hand: causal GQA with RoPE at positions start.., SwiGLU MLP."""
    n, heads, kv_heads = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(start, start + n, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    h = _rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
    q = (h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).view(n, heads, d).transpose(0, 1)
    k = (h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).view(n, kv_heads, d).transpose(0, 1)
    v = (h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).view(n, kv_heads, d).transpose(0, 1)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.exp() / scores.exp().sum(-1, keepdim=True)  # rows are small: no overflow
    attn = (probs @ v).transpose(0, 1).reshape(n, heads * d)
    x = x + attn @ w[p + "self_attn.o_proj.weight"].T

    h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
    return x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T


def _release_encoding(pipe: EasyRefPipeline, w: dict[str, torch.Tensor], images, prompt: str) -> torch.Tensor:
    """The release's computation from its raw checkpoint weights, step by step (METHOD.md §4)."""
    cfg = pipe.encoder.language_model.config
    inputs = pipe.encoder.processor([images], [prompt])
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        visual, start, vision = pipe.encoder.mllm.visual, 0, []
        for i, count in enumerate(inputs["image_grid_thw"].prod(-1).tolist()):
            chunk = inputs["pixel_values"][start:start + count]
            vision.append(visual(chunk, grid_thw=inputs["image_grid_thw"][i:i + 1]).pooler_output)
            start += count
    x = w["multimodal_llm.model.embed_tokens.weight"][ids].clone()
    image_positions = ids == pipe.encoder.mllm.config.image_token_id
    x[image_positions] = torch.cat(vision)

    num_layers = len({key.split(".")[3] for key in w if key.startswith("multimodal_llm.model.layers.")})
    final_layers = len({key.split(".")[2] for key in w if key.startswith("mllm_final_layer.layers.")})
    for i in range(num_layers - final_layers):
        x = _decoder_layer(x, w, f"multimodal_llm.model.layers.{i}.", cfg, start=0)
    prefix = _rms_norm(x, w["multimodal_llm.model.norm.weight"], cfg.rms_norm_eps)

    x = torch.cat([prefix, w["mllm_final_layer.reference_tokens"]])
    for i in range(final_layers):
        x = _decoder_layer(x, w, f"mllm_final_layer.layers.{i}.", cfg, start=0)
    x = _rms_norm(x, w["mllm_final_layer.norm.weight"], cfg.rms_norm_eps)[prefix.shape[0]:]

    x = x @ w["image_proj_model.proj.0.weight"].T + w["image_proj_model.proj.0.bias"]
    x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    x = x @ w["image_proj_model.proj.2.weight"].T + w["image_proj_model.proj.2.bias"]
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    x = (x - mean) / torch.sqrt(var + 1e-5) * w["image_proj_model.proj.3.weight"] + w["image_proj_model.proj.3.bias"]
    return x.unsqueeze(0)


def test_imported_weights_compute_what_the_release_computes(imported: EasyRefPipeline,
                                                            checkpoint: dict[str, torch.Tensor], images) -> None:
    ours = imported.encode_references(images, PROMPT)
    reference = _release_encoding(imported, checkpoint, images, PROMPT)
    assert ours.shape == reference.shape == (1, NUM_TOKENS, 64)
    diff = (ours - reference).abs().max().item()
    assert diff < 1e-4, f"max abs diff {diff}"

    config = imported.encoder.config
    config.reference_attention = "bidirectional"
    try:
        with torch.no_grad():
            bidirectional = imported.encoder.encode([images], [PROMPT])
    finally:
        config.reference_attention = "causal"
    assert (bidirectional - reference).abs().max().item() > 1e-3


# -- bad inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.pt"])
def test_garbage_file(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(ModelFormatError, match="garbage"):
        read_official_checkpoint(path)


def test_missing_file(models: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no such file"):
        import_official(tmp_path / "absent.safetensors", tmp_path / "out", model=models)
    assert not (tmp_path / "out").exists()


def test_pt_without_easyref_keys(tmp_path: Path) -> None:
    torch.save({"module": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ModelFormatError, match="no EasyRef weights"):
        read_official_checkpoint(tmp_path / "other.pt")


ATTN2 = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"


@pytest.mark.parametrize("key", ["image_proj_model.extra.weight", f"{ATTN2}.bogus.weight",
                                 ATTN2.replace("down_blocks.1", "down_blocks.7") + ".to_k_ip.weight"])
def test_unknown_key_is_named(key: str, models: Path, checkpoint: dict[str, torch.Tensor], tmp_path: Path) -> None:
    save_file({**checkpoint, key: torch.zeros(64, 64)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ModelFormatError, match=key.replace(".", r"\.")):
        import_official(tmp_path / "extra.safetensors", tmp_path / "out", model=models)
    assert not (tmp_path / "out").exists()


def test_missing_weight_is_named(models: Path, checkpoint: dict[str, torch.Tensor], tmp_path: Path) -> None:
    state = {key: value for key, value in checkpoint.items() if key != f"{ATTN2}.to_v_ip.weight"}
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelFormatError, match="to_v_ip"):
        import_official(tmp_path / "missing.safetensors", tmp_path / "out", model=models)
    assert not (tmp_path / "out").exists()


def test_projection_width_mismatch(models: Path, checkpoint: dict[str, torch.Tensor], tmp_path: Path) -> None:
    state = dict(checkpoint)
    state["image_proj_model.proj.2.weight"] = torch.zeros(48, 32)
    for key in ("image_proj_model.proj.2.bias", "image_proj_model.proj.3.weight", "image_proj_model.proj.3.bias"):
        state[key] = torch.zeros(48)
    save_file(state, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"\(48, 32\).*\(64, 32\)"):
        import_official(tmp_path / "narrow.safetensors", tmp_path / "out", model=models)
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_output(models: Path, files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="not empty"):
        import_official(files["safetensors"], tmp_path / "out", model=models)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_non_finite_checkpoint_is_refused(models: Path, checkpoint: dict[str, torch.Tensor], tmp_path: Path) -> None:
    from easyref.errors import NonFiniteError

    state = {key: value.clone() for key, value in checkpoint.items()}
    state["image_proj_model.proj.2.weight"][0, 0] = float("inf")
    save_file(state, str(tmp_path / "inf.safetensors"))
    with pytest.raises(NonFiniteError, match=r"image_proj_model\.proj\.2\.weight holds NaN or infinite"):
        import_official(tmp_path / "inf.safetensors", tmp_path / "out", model=models)
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """Unpickling this calls a function: what a weights-only load must refuse."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_a_checkpoint_holding_code_is_refused_in_one_clean_line_and_leaves_no_folders(models: Path, tmp_path: Path,
                                                                                     capsys) -> None:
    torch.save({"image_proj_model.latents": _RunsCode()}, tmp_path / "code.pt")
    output = tmp_path / "new" / "deeper" / "adapter"
    with pytest.raises(ModelFormatError) as caught:
        import_official(tmp_path / "code.pt", output, model=models)
    message = str(caught.value)
    assert message == (f"checkpoint {tmp_path / 'code.pt'} holds Python objects (code), not only tensors; it was "
                       "not loaded, since loading it could run that code")
    assert "\x1b" not in message and "this ran" not in capsys.readouterr().out
    assert not (tmp_path / "new").exists()
