"""Resolve a model part given as a bundled name, a local folder or a Hugging Face Hub id to a local folder.

Everything downstream loads from a local path, so there is one place that talks to the hub and
one clear error when it cannot be reached (instead of a stack of retries deep inside
``from_pretrained``). Bundled names (``shapesworld``: the miniature model trained by
``easyref shapes reproduce``, shipped inside the package) resolve without any network.
"""

from __future__ import annotations

import re
from pathlib import Path

from easyref.errors import HubUnavailableError, ModelFormatError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUNDLED_MODELS = ("shapesworld",)


def bundled_folder(name: str) -> Path:
    """Where the package keeps a bundled model (it may be absent in a build that did not include it)."""
    return Path(__file__).resolve().parent / "models" / name


def resolve(source: str | Path, what: str) -> Path:
    """Return a local folder for ``source``; download (or find in the cache) when it is a hub id."""
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
        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: fall through to the network
        pass
    try:
        return Path(snapshot_download(text, etag_timeout=10))
    except Exception as exc:  # noqa: BLE001 - any hub failure is the same problem for the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HubUnavailableError(
            f"{what} {text}: not in the local cache and the Hugging Face Hub cannot be reached ({reason})"
        ) from None
