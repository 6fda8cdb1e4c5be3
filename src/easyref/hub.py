"""Resolve a model part given as a bundled name, a local folder or a Hugging Face Hub id to a local folder.

Everything downstream loads from a local path, so there is one place that talks to the hub and
one clear error when it cannot be reached (instead of a stack of retries deep inside
``from_pretrained``). Bundled names (``shapesworld``: the miniature model trained by
``easyref shapes reproduce``, shipped inside the package) resolve without any network.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Literal

from easyref.errors import HubUnavailableError, ModelFormatError, first_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUNDLED_MODELS = ("shapesworld",)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_log = logging.getLogger(__name__)

# What a hub download of a transformers model, or of a pipeline's configs alone, fetches (a diffusers
# pipeline: see _pipeline_files).
_KIND_FILES = {"model": {"allow_patterns": ["*.json", "*.txt", "*.jinja", "*.model", "*.safetensors"],
                         "ignore_patterns": ["*onnx*", "*.gguf"]},
               "config": {"allow_patterns": ["*.json", "*.txt"]}}


def bundled_folder(name: str) -> Path:
    """Where the package keeps a bundled model (it may be absent in a build that did not include it)."""
    return Path(__file__).resolve().parent / "models" / name


def resolve(source: str | Path, what: str, kind: Literal["pipeline", "model", "config"] | None = None) -> Path:
    """Return a local folder for ``source``; find it in the hub cache or download it when it is a hub id.

    ``kind`` limits a download to what a diffusers pipeline or a transformers model needs, or to a
    pipeline's configs and tokenizers alone (without it: the whole repository); a download says first
    how large it is. A cached copy that lacks the weights ``kind`` needs (a configs-only download made
    for a single-file base) is completed, not returned half.
    """
    path = Path(source).expanduser()
    if str(source) in BUNDLED_MODELS and not path.exists():
        folder = bundled_folder(str(source))
        if not folder.is_dir():
            raise ModelFormatError(f"{what} {source}: this installation does not include the bundled model "
                                   f"(expected at {folder}; 'easyref shapes reproduce' builds it)")
        return folder
    if path.exists():
        if not path.is_dir():
            raise ModelFormatError(f"{what} {source} is a file; expected a model folder")
        return path
    text = str(source)
    if not _HUB_ID.match(text):
        raise ModelFormatError(f"{what} {source}: no such folder (and not a hub id like owner/name)")
    from huggingface_hub import snapshot_download

    try:
        cached = Path(snapshot_download(text, local_files_only=True))
        if kind not in ("pipeline", "model") or _complete(cached, kind):
            return cached
    except Exception:  # noqa: BLE001 - not cached: fall through to the network
        pass
    refuse_if_offline(f"{what} {text}")
    files = _pipeline_files(text, what) if kind == "pipeline" else _KIND_FILES.get(kind, {})
    try:
        _announce(text, what, files)
        return Path(snapshot_download(text, etag_timeout=10, **files))
    except Exception as exc:  # noqa: BLE001 - any hub failure is the same problem for the user
        raise HubUnavailableError(
            f"{what} {text}: not in the local cache and the Hugging Face Hub cannot be reached ({first_line(exc)})"
        ) from None


def is_single_file(source: str | Path) -> bool:
    """Whether ``source`` names one checkpoint file (an existing file, or a name ending like one) rather than a
    folder or a hub id."""
    path = Path(source).expanduser()
    return path.is_file() or (not path.is_dir() and path.suffix.lower() in CHECKPOINT_SUFFIXES)


def has_weights(folder: Path) -> bool:
    """Whether a model folder holds a weights file (safetensors, its shards, or a pickle ``.bin``)."""
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def parts_without_weights(folder: Path) -> list[str]:
    """The components of a diffusers pipeline folder that have a ``config.json`` but no weights file (an
    interrupted download, or the configs-only one a single-file base makes)."""
    return sorted(part.name for part in folder.iterdir()
                  if part.is_dir() and (part / "config.json").is_file() and not has_weights(part))


def _complete(folder: Path, kind: Literal["pipeline", "model"]) -> bool:
    if kind == "model":
        return has_weights(folder)
    return (folder / "model_index.json").is_file() and not parts_without_weights(folder)


def refuse_if_offline(missing: str) -> None:
    """With ``HF_HUB_OFFLINE`` set, name what is missing from the cache instead of letting a download fail."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise HubUnavailableError(f"{missing} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                                  "HF_HUB_OFFLINE is set: download it on a connected machine first")


def _pipeline_files(repo: str, what: str) -> dict[str, list[str]]:
    """A diffusers pipeline's configs, texts and safetensors weights of the components its model_index.json names.

    SDXL's repository also holds a 7 GB single-file checkpoint, fp16 variants, a second VAE, ONNX and
    OpenVINO exports; diffusers' own from_pretrained skips them too.
    """
    from huggingface_hub import hf_hub_download

    try:
        index = json.loads(Path(hf_hub_download(repo, "model_index.json", etag_timeout=10)).read_text())
    except Exception as exc:  # noqa: BLE001 - offline, missing or unreadable: the same problem for the user
        raise HubUnavailableError(f"{what} {repo}: cannot read its model_index.json from the Hugging Face cache or "
                                  f"the Hub ({first_line(exc)})") from None
    parts = [name for name, value in index.items()
             if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None]
    patterns = [f"{part}/*.{suffix}" for part in parts for suffix in ("json", "txt", "safetensors")]
    return {"allow_patterns": ["model_index.json", *patterns], "ignore_patterns": ["*.fp16.*"]}


def _announce(repo: str, what: str, files: dict[str, list[str]]) -> None:
    """Say how much a download will fetch before it starts (a real SDXL + Qwen2-VL is about 15 GB)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    info = HfApi().model_info(repo, files_metadata=True)
    sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}
    chosen = filter_repo_objects(list(sizes), allow_patterns=files.get("allow_patterns"),
                                 ignore_patterns=files.get("ignore_patterns"))
    total = sum(sizes[name] for name in chosen)
    _log.warning("downloading %s %s (%.1f GB) into the Hugging Face cache", what, repo, total / 1e9)
