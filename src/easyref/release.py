"""The authors' release by name: ``--model official`` / ``from_pretrained("official")``.

The three parts come from the Hugging Face Hub into its normal cache: SDXL base, Qwen2-VL-2B-Instruct and
the release repository, whose weights file is found by listing it (the release does not name it). The
checkpoint is converted once (:func:`easyref.official.import_official`) into a folder kept in the same
cache and keyed by the checkpoint's content hash, so every later load reuses it and a new release is
converted afresh.
"""

from __future__ import annotations

from pathlib import Path

from easyref.errors import HubUnavailableError, ModelFormatError, first_line
from easyref.files import sha256_file
from easyref.hub import is_single_file, refuse_if_offline, resolve

OFFICIAL_NAME = "official"
RELEASE_REPO = "zongzhuofan/EasyRef"
RELEASE_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
RELEASE_MLLM = "Qwen/Qwen2-VL-2B-Instruct"
_PREFERRED_SUFFIXES = ((".safetensors",), (".pt", ".bin", ".pth"))  # safetensors first: no pickle
CONVERTED_FOLDER = "easyref-converted"


def official_parts(base: str | Path | None = None, mllm: str | Path | None = None,
                   base_config: str | Path | None = None) -> dict[str, Path]:
    """Local folders for the release's ``base``, ``mllm`` and converted ``adapter`` (given parts replace theirs).

    A single-file ``base`` stays a file: it loads with ``base_config`` (default: SDXL base's configuration
    alone), so the release base's weights are not fetched for it.
    """
    base_folder = Path(base).expanduser() if base is not None and is_single_file(base) else \
        resolve(base or RELEASE_BASE, "base model", "pipeline")
    mllm_folder = resolve(mllm or RELEASE_MLLM, "MLLM", "model")
    checkpoint = release_checkpoint()
    adapter = converted_folder(checkpoint)
    if not (adapter / "config.json").is_file():
        from easyref.official import import_official

        import_official(checkpoint, adapter, base=base_folder, mllm=mllm_folder, base_config=base_config,
                        overwrite=True)
    return {"base": base_folder, "mllm": mllm_folder, "adapter": adapter}


def _pick_weights(names: list[str]) -> str:
    """The one weights file among a repository's files (safetensors preferred), or an error naming the choices."""
    for suffixes in _PREFERRED_SUFFIXES:
        found = sorted(name for name in names if name.endswith(suffixes))
        if len(found) == 1:
            return found[0]
        if found:
            raise ModelFormatError(f"{RELEASE_REPO} holds several weights files ({', '.join(found)}); convert the "
                                   "one you want with 'easyref convert --official FILE'")
    raise ModelFormatError(f"{RELEASE_REPO} holds no weights file (.safetensors, .pt, .bin)")


def release_checkpoint() -> Path:
    """The release's weights file in the hub cache, downloaded (that file alone) when missing."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        cached = Path(snapshot_download(RELEASE_REPO, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or only partly): list the repository
        cached = None
    if cached is not None:
        names = [str(path.relative_to(cached)) for path in cached.rglob("*") if path.is_file()]
        if any(name.endswith(suffixes) for suffixes in _PREFERRED_SUFFIXES for name in names):
            return cached / _pick_weights(names)
    refuse_if_offline(f"the EasyRef release {RELEASE_REPO}")
    try:
        name = _pick_weights(HfApi().list_repo_files(RELEASE_REPO))
        return Path(hf_hub_download(RELEASE_REPO, name, etag_timeout=10))
    except ModelFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - any hub failure is the same problem for the user
        raise HubUnavailableError(f"the EasyRef release {RELEASE_REPO}: not in the local cache and the Hugging Face "
                                  f"Hub cannot be reached ({first_line(exc)})") from None


def converted_folder(checkpoint: Path) -> Path:
    """Where the converted adapter of ``checkpoint`` lives: the hub cache, keyed by the file's SHA-256.

    A hub-cached LFS file is a link to a blob named by that hash, so it costs nothing to read; a plain
    file is hashed.
    """
    from huggingface_hub import constants

    target = Path(checkpoint).resolve()
    digest = target.name if len(target.name) == 64 and target.parent.name == "blobs" else sha256_file(target)
    return Path(constants.HF_HUB_CACHE) / CONVERTED_FOLDER / f"easyref-{digest[:16]}"
