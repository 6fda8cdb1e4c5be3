"""EasyRef: group image reference for SDXL through a multimodal LLM.

``import easyref`` stays light (no torch, diffusers or transformers): the public names below
are imported on first use through a module-level ``__getattr__``, so ``easyref --help`` and
``easyref.__version__`` answer instantly.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from easyref import errors
    from easyref.config import EasyRefConfig
    from easyref.controls import ReferenceGroup
    from easyref.pipeline import EasyRefPipeline

try:
    __version__ = metadata.version("easyref")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# public name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "EasyRefPipeline": ("easyref.pipeline", "EasyRefPipeline"),
    "EasyRefConfig": ("easyref.config", "EasyRefConfig"),
    "ReferenceGroup": ("easyref.controls", "ReferenceGroup"),
    "errors": ("easyref.errors", None),
}

__all__ = ["EasyRefConfig", "EasyRefPipeline", "ReferenceGroup", "__version__", "errors"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'easyref' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
