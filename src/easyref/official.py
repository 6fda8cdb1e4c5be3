"""Import the authors' released EasyRef checkpoint into an adapter folder (METHOD.md §4).

The release ships one state dict (a ``.safetensors`` file, or a DeepSpeed ``.pt`` holding it
under ``"module"``) with these parts, mapped to our adapter keys as follows::

    image_proj_model.proj.{0,2,3}.*                  -> projection.{0,2,3}.*
    mllm_final_layer.layers.{i}.*                    -> final.layers.{i}.*      (K = number of i)
    mllm_final_layer.norm.weight                     -> final.norm.weight
    mllm_final_layer.reference_tokens                -> final.reference_tokens  (N = its rows)
    unet.<attn>.processor.to_{k,v}_ip.weight         -> unet.<attn>.processor.to_{k,v}_ip.0.weight
    unet.<attn>.processor.to_{q,k,v}_lora.down.weight -> unet_lora.<attn>.to_{q,k,v}.lora_A.weight
    unet.<attn>.processor.to_out_lora.up.weight      -> unet_lora.<attn>.to_out.0.lora_B.weight
    multimodal_llm.model.*                           -> model.language_model.*  (mllm.safetensors)
    multimodal_llm.visual.*                          -> model.visual.*          (mllm.safetensors)

Dropped because EasyRef never uses them: ``multimodal_llm.lm_head.*`` (the LM head),
``mllm_final_layer.embed_tokens.*`` (the copy runs on embeddings) and rotary ``inv_freq``
buffers. Any other key is an error. The imported config runs the final layer causally, as the
release actually computes.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch

from easyref.config import EasyRefConfig, ReferenceAttention
from easyref.errors import ModelFormatError, OutputPathError, ShapeMismatchError, first_line
from easyref.files import atomic_folder
from easyref.weights import (
    adapter_state_dict,
    check_finite,
    load_adapter_state,
    load_mllm_state,
    mllm_state_dict,
    read_safetensors,
    save_adapter,
)

RELEASE_PREFIXES = ("image_proj_model.", "mllm_final_layer.", "unet.", "multimodal_llm.")

_LAYER_PARAM = (r"(?:self_attn\.[qkv]_proj\.(?:weight|bias)|self_attn\.o_proj\.weight"
                r"|mlp\.(?:gate|up|down)_proj\.weight|(?:input|post_attention)_layernorm\.weight)")
_LORA_SIDES = {"down": "lora_A", "up": "lora_B"}
_LORA_TARGETS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}

# release key -> our key; the first matching rule wins.
_TO_OURS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"image_proj_model\.proj\.([023])\.(weight|bias)"), lambda m: f"projection.{m[1]}.{m[2]}"),
    (re.compile(r"mllm_final_layer\.reference_tokens"), lambda m: "final.reference_tokens"),
    (re.compile(r"mllm_final_layer\.norm\.weight"), lambda m: "final.norm.weight"),
    (re.compile(rf"mllm_final_layer\.layers\.(\d+)\.({_LAYER_PARAM})"), lambda m: f"final.layers.{m[1]}.{m[2]}"),
    (re.compile(r"unet\.(.+\.processor)\.(to_[kv]_ip)\.weight"), lambda m: f"unet.{m[1]}.{m[2]}.0.weight"),
    (re.compile(r"unet\.(.+)\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight"),
     lambda m: f"unet_lora.{m[1]}.{_LORA_TARGETS[m[2]]}.{_LORA_SIDES[m[3]]}.weight"),
    # current transformers naming, in case a checkpoint was re-saved with it
    (re.compile(r"multimodal_llm\.model\.((?:language_model|visual)\..+)"), lambda m: f"model.{m[1]}"),
    (re.compile(r"multimodal_llm\.model\.(.+)"), lambda m: f"model.language_model.{m[1]}"),
    (re.compile(r"multimodal_llm\.visual\.(.+)"), lambda m: f"model.visual.{m[1]}"),
]
# our key -> release key (4.45 naming): the inverse, used by export and in error messages.
_TO_RELEASE: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"projection\.(.+)"), lambda m: f"image_proj_model.proj.{m[1]}"),
    (re.compile(r"final\.(.+)"), lambda m: f"mllm_final_layer.{m[1]}"),
    (re.compile(r"unet\.(.+)\.(to_[kv]_ip)\.0\.weight"), lambda m: f"unet.{m[1]}.{m[2]}.weight"),
    (re.compile(r"unet_lora\.(.+)\.to_(q|k|v|out)(?:\.0)?\.lora_(A|B)\.weight"),
     lambda m: f"unet.{m[1]}.processor.to_{m[2]}_lora.{'down' if m[3] == 'A' else 'up'}.weight"),
    (re.compile(r"model\.language_model\.(.+)"), lambda m: f"multimodal_llm.model.{m[1]}"),
    (re.compile(r"model\.visual\.(.+)"), lambda m: f"multimodal_llm.visual.{m[1]}"),
]
_DROPPED = re.compile(r"multimodal_llm\.lm_head\..+|mllm_final_layer\.embed_tokens\..+|.*rotary_emb\.inv_freq")


def _apply(rules, key: str) -> str | None:
    for pattern, build in rules:
        match = pattern.fullmatch(key)
        if match:
            return build(match)
    return None


def release_key(key: str) -> str:
    """The release's name for one of our adapter (``final.*``, ``unet.*``, ...) or MLLM (``model.*``) keys."""
    name = _apply(_TO_RELEASE, key)
    if name is None:
        raise ModelFormatError(f"{key} has no counterpart in the release's checkpoint layout")
    return name


# -- reading -----------------------------------------------------------------------------------
def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The release's state dict from a ``.safetensors`` file or a DeepSpeed/torch ``.pt``/``.bin``."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"checkpoint {path}: no such file")
    if not path.is_file():
        raise ModelFormatError(f"checkpoint {path} is a folder; pass the .safetensors or .pt file inside it")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt pickle can raise almost anything
            if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in str(exc).lower():
                raise ModelFormatError(f"checkpoint {path} holds Python objects (code), not only tensors; it was "
                                       "not loaded, since loading it could run that code") from None
            raise ModelFormatError(
                f"checkpoint {path} is not a readable weights-only torch file ({first_line(exc)})"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("module"), dict):
            state = state["module"]
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise ModelFormatError(f"checkpoint {path} does not hold a state dict")
    if state and all(key.startswith("module.") for key in state):  # saved from a DDP-wrapped model
        state = {key[len("module."):]: value for key, value in state.items()}
    if not any(key.startswith(RELEASE_PREFIXES) for key in state):
        raise ModelFormatError(
            f"checkpoint {path} holds no EasyRef weights (no keys starting with {', '.join(RELEASE_PREFIXES)})"
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ModelFormatError(f"checkpoint {path}: {key} is a {type(value).__name__}, not a tensor")
    check_finite(state, f"checkpoint {path}")
    return state


# -- converting --------------------------------------------------------------------------------
def convert_official(
    state: dict[str, torch.Tensor], *, mllm_hidden_size: int | None = None,
    cross_attention_dim: int | None = None, reference_attention: ReferenceAttention = "causal",
    source: str = "checkpoint",
) -> tuple[EasyRefConfig, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Rename a release state dict: ``(config, adapter_state, mllm_state or None)``.

    ``adapter_state`` is in ``model.safetensors`` naming, ``mllm_state`` (present only when
    the checkpoint holds ``multimodal_llm.*``) in ``mllm.safetensors`` naming. The sizes of the
    target models, when given, are checked here so the error names the release's keys.
    """
    adapter: dict[str, torch.Tensor] = {}
    mllm: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ours = _apply(_TO_OURS, key)
        if ours is None:
            if _DROPPED.fullmatch(key):
                continue
            raise ModelFormatError(f"{source}: unknown key {key} (not part of the release's EasyRef layout)")
        (mllm if ours.startswith("model.") else adapter)[ours] = value

    for needed in ("final.reference_tokens", "final.norm.weight", "projection.2.weight"):
        if needed not in adapter:
            raise ModelFormatError(f"{source} lacks {release_key(needed)}")
    tokens = adapter["final.reference_tokens"]
    if tokens.ndim != 2:
        raise ShapeMismatchError(
            f"{source}: mllm_final_layer.reference_tokens has shape {tuple(tokens.shape)}, expected (tokens, hidden)"
        )
    _check_sizes(adapter, mllm_hidden_size, cross_attention_dim, source)
    num_tokens, hidden = tokens.shape
    proj = adapter["projection.2.weight"]
    layers = sorted({int(key.split(".")[2]) for key in adapter if key.startswith("final.layers.")})
    if layers != list(range(len(layers))) or not layers:
        raise ModelFormatError(
            f"{source}: mllm_final_layer.layers must be numbered 0..K-1 with K >= 1, found {layers}"
        )
    ranks = {int(value.shape[0]) for key, value in adapter.items()
             if key.startswith("unet_lora.") and key.endswith(".lora_A.weight")}
    if len(ranks) > 1:
        raise ModelFormatError(f"{source}: LoRA down weights have different ranks {sorted(ranks)}")
    config = EasyRefConfig(
        mllm_hidden_size=int(hidden), cross_attention_dim=int(proj.shape[0]), num_reference_tokens=int(num_tokens),
        num_final_layers=len(layers), aggregation="tokens", reference_attention=reference_attention,
        lora_rank=ranks.pop() if ranks else None,
    )
    return config, adapter, (mllm or None)


def _check_sizes(adapter: dict[str, torch.Tensor], mllm_hidden_size: int | None, cross_attention_dim: int | None,
                 source: str) -> None:
    """Reference-token width vs the MLLM, projection width vs the base UNet."""
    tokens, proj = adapter["final.reference_tokens"], adapter["projection.2.weight"]
    if mllm_hidden_size is not None and tokens.shape[1] != mllm_hidden_size:
        raise ShapeMismatchError(
            f"{source}: mllm_final_layer.reference_tokens has shape {tuple(tokens.shape)} but the MLLM "
            f"(hidden size {mllm_hidden_size}) needs {(tokens.shape[0], mllm_hidden_size)}"
        )
    if cross_attention_dim is not None and proj.shape[0] != cross_attention_dim:
        raise ShapeMismatchError(
            f"{source}: image_proj_model.proj.2.weight has shape {tuple(proj.shape)} but the base UNet "
            f"(cross-attention dim {cross_attention_dim}) needs {(cross_attention_dim, *proj.shape[1:])}"
        )


def _check_against(given: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str,
                   what: str, require_all: bool) -> None:
    """Every given key has a place of the same shape; messages use the release's names."""
    for key, value in given.items():
        if key not in expected:
            raise ModelFormatError(f"{source}: {release_key(key)} has no place in this {what}")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ShapeMismatchError(
                f"{source}: {release_key(key)} has shape {tuple(value.shape)} but the {what} "
                f"needs {tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(given)) if require_all else []
    if missing:
        raise ModelFormatError(
            f"{source} lacks {len(missing)} weights the {what} needs, e.g. {release_key(missing[0])}"
        )


# -- importing ---------------------------------------------------------------------------------
def _model_sources(model, base, mllm) -> tuple[str | Path, str | Path]:
    from easyref.hub import resolve

    parts = {"base": base, "mllm": mllm}
    for part in parts:
        if parts[part] is None:
            if model is None:
                raise ModelFormatError(f"no {part} given: pass a model folder or {part}=...")
            folder = resolve(model, "model") / part
            if not folder.is_dir():
                raise ModelFormatError(f"model folder {model} has no {part}/ part (or give {part}= explicitly)")
            parts[part] = folder
    return parts["base"], parts["mllm"]


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise OutputPathError(f"output {output} is a file; expected an adapter folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputPathError(f"output folder {output} is not empty (--overwrite, or overwrite=True in Python, "
                              "replaces it)")
    # Missing parent folders are made only when the adapter is written: a refused conversion leaves none.
    existing = next(folder for folder in (output.absolute(), *output.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise OutputPathError(f"cannot create {output}: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise OutputPathError(f"output folder {existing} is not writable")


def _checkpoint_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {value.dtype for value in state.values() if value.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def import_official(
    checkpoint: str | os.PathLike, output: str | os.PathLike, *, model: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None, mllm: str | os.PathLike | None = None,
    reference_attention: ReferenceAttention = "causal", torch_dtype: torch.dtype | None = None,
    overwrite: bool = False, base_config: str | os.PathLike | None = None,
) -> Path:
    """Convert a release checkpoint into an adapter folder for ``EasyRefPipeline.from_pretrained``.

    The base SDXL and the Qwen2-VL come from a model folder (``base/``, ``mllm/``) or from
    ``base=`` / ``mllm=`` (``base_config=`` configures a single-file base). The weights are loaded
    into a real pipeline (every shape checked) before anything is written; the folder appears
    complete or not at all. ``torch_dtype`` defaults to the checkpoint's own dtype (float32 when it
    mixes several).
    """
    from easyref.pipeline import EasyRefPipeline

    output = Path(output)
    _prepare_output(output, overwrite)
    state = read_official_checkpoint(checkpoint)
    source = str(checkpoint)
    config, adapter_state, mllm_state = convert_official(state, reference_attention=reference_attention,
                                                        source=source)
    base_source, mllm_source = _model_sources(model, base, mllm)
    pipe = EasyRefPipeline.create(
        base_source, mllm_source, torch_dtype=torch_dtype or _checkpoint_dtype(state),
        num_reference_tokens=config.num_reference_tokens, num_final_layers=config.num_final_layers,
        aggregation=config.aggregation, reference_attention=config.reference_attention,
        lora_rank=config.lora_rank, base_config=base_config,
    )
    _check_sizes(adapter_state, pipe.config.mllm_hidden_size, pipe.config.cross_attention_dim, source)
    encoder, unet = pipe.encoder, pipe.base.unet
    _check_against(adapter_state, adapter_state_dict(encoder, unet), source, "model", require_all=True)
    load_adapter_state(adapter_state, encoder, unet, source)
    if mllm_state is not None:
        _check_against(mllm_state, mllm_state_dict(encoder), source, "MLLM", require_all=False)
        load_mllm_state(encoder, mllm_state, source)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create {output.parent} ({first_line(exc)})") from None
    with atomic_folder(output) as folder:
        save_adapter(folder, pipe.config, encoder, unet, mllm_state)
    return output


# -- exporting (the inverse; makes release-layout checkpoints for tests) ------------------------
def export_official_layout(pipe, include_mllm: bool = True) -> dict[str, torch.Tensor]:
    """A pipeline's EasyRef weights (and its MLLM's, with ``include_mllm``) in the release's layout."""
    state = adapter_state_dict(pipe.encoder, pipe.base.unet)
    if include_mllm and pipe.encoder is not None:
        state.update(mllm_state_dict(pipe.encoder))
    out = {release_key(key): value for key, value in state.items()}
    head = getattr(pipe.encoder.mllm_for_saving(), "lm_head", None) if include_mllm and pipe.encoder else None
    if head is not None:
        out["multimodal_llm.lm_head.weight"] = head.weight
    return {key: value.detach().to("cpu").clone().contiguous() for key, value in out.items()}
