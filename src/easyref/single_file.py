"""SDXL finetunes as model sites share them: one ``.safetensors`` file in the original (LDM) layout.

diffusers' ``from_single_file`` converts such a file into a ``StableDiffusionXLPipeline``. What the
file does not hold is the pipeline's configuration (block sizes, tokenizers, scheduler): that comes
from a diffusers folder or hub id, by default SDXL base's own. Only its small config and tokenizer
files are downloaded when they are not cached, and a local folder works offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from easyref.errors import ModelFormatError, first_line
from easyref.hub import resolve
from easyref.release import RELEASE_BASE

# Every SDXL checkpoint in the original layout keeps its UNet under this prefix (diffusers' LDM_UNET_KEY).
UNET_PREFIX = "model.diffusion_model."
DEFAULT_CONFIG = RELEASE_BASE


def is_single_file(source: str | Path) -> bool:
    """Whether ``source`` names a file (a single-file checkpoint) rather than a folder or a hub id."""
    return Path(source).expanduser().is_file()


def config_in_use(base: str | Path, config: str | Path | None) -> str | None:
    """The configuration a single-file ``base`` loads with (``config`` or the default), for sidecars;
    None for a folder or hub id, which carries its own."""
    if not is_single_file(base):
        return None
    return str(config if config is not None else DEFAULT_CONFIG)


def load_single_file_base(path: str | Path, config: str | Path | None = None,
                          torch_dtype: torch.dtype | None = None):
    """Load an SDXL ``.safetensors`` checkpoint with the pipeline configuration of ``config``.

    Refused with one line each: a pickle checkpoint (``.ckpt``: loading runs code), a file that is not
    an SDXL checkpoint in the original layout, and weights that do not fit the configuration.
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ModelFormatError(f"base model {path}: a single-file base must be a .safetensors file (a .ckpt is a "
                               "pickle, and loading one can run code)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelFormatError(f"base model {path} is not a readable safetensors file: {first_line(exc)}") from None
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        raise ModelFormatError(f"base model {path} is not an SDXL checkpoint in the original single-file layout "
                               f"(no {UNET_PREFIX}* weights); a diffusers model is given as its folder")
    source = config if config is not None else DEFAULT_CONFIG
    folder = resolve(source, "base model configuration", "config")
    if not (folder / "model_index.json").is_file():
        raise ModelFormatError(f"base model configuration {source} is not a diffusers pipeline folder "
                               "(no model_index.json)")
    try:
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), torch_dtype=torch_dtype,
                                                          local_files_only=True)
    except (ValueError, KeyError, RuntimeError, OSError, SingleFileComponentError) as exc:
        raise ModelFormatError(f"base model {path} does not load with the configuration of {source}: "
                               f"{first_line(exc)}") from None
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and any(p.is_meta for p in component.parameters()):
            raise ModelFormatError(f"base model {path} lacks weights of the {name} that the configuration of "
                                   f"{source} has")
    return pipe
