"""SDXL finetunes as model sites share them: one ``.safetensors`` file in the original (LDM) layout.

diffusers' ``from_single_file`` converts such a file into a ``StableDiffusionXLPipeline``. What the
file does not hold is the pipeline's configuration (block sizes, tokenizers, scheduler): that comes
from a diffusers folder or hub id, by default SDXL base's own. Only its small config and tokenizer
files are downloaded when they are not cached, and a local folder works offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from easyref.errors import HubUnavailableError, InvalidArgumentError, ModelFormatError, first_line
from easyref.hub import is_single_file, resolve
from easyref.release import RELEASE_BASE

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionXLPipeline

# An SDXL base checkpoint in the original layout keeps its UNet under the first prefix and its second
# (OpenCLIP) text encoder under the second; SD 1.x / 2.x have neither the second, the refiner not both.
SDXL_PREFIXES = ("model.diffusion_model.", "conditioner.embedders.1.")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def check_base_config(base: str | Path | None, base_config: str | Path | None) -> None:
    """Refuse a configuration given for a base that is not a single file, before anything loads or downloads
    (a model folder's base, the release's and a hub id's carry their own)."""
    if base_config is not None and (base is None or not is_single_file(base)):
        where = f"the base {base} is a folder or hub id" if base is not None else "no single-file base is given"
        raise InvalidArgumentError(f"a base configuration ({base_config}) describes a single-file base, but "
                                   f"{where} with its own configuration")


def _config_source(base_config: str | Path | None) -> str | Path:
    return base_config if base_config is not None else RELEASE_BASE


def config_in_use(base: str | Path, base_config: str | Path | None) -> str | None:
    """The configuration a single-file ``base`` loads with, for sidecars (a local folder by absolute path);
    None for a folder or hub id, which carries its own."""
    if not is_single_file(base):
        return None
    source = Path(_config_source(base_config)).expanduser()
    return str(source.absolute()) if source.exists() else str(_config_source(base_config))


def _check_file(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelFormatError(f"base model {path}: a single-file base must be a .safetensors file ({path.suffix} "
                               "is a pickle, and loading one can run code)")
    if path.suffix != ".safetensors":
        raise ModelFormatError(f"base model {path}: a single-file base must be named *.safetensors, in lower case "
                               "(diffusers tells the format from the name)")
    if not path.is_file():
        raise ModelFormatError(f"base model {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelFormatError(f"base model {path} is not a readable safetensors file: {first_line(exc)}") from None
    if not all(any(key.startswith(prefix) for key in keys) for prefix in SDXL_PREFIXES):
        raise ModelFormatError(f"base model {path} is not an SDXL base checkpoint in the original single-file "
                               f"layout (it needs {' and '.join(p + '*' for p in SDXL_PREFIXES)} weights; SD 1.x, "
                               "2.x and the refiner are other models); a diffusers model is given as its folder")


def load_single_file_base(path: str | Path, base_config: str | Path | None = None,
                          torch_dtype: torch.dtype | None = None) -> StableDiffusionXLPipeline:
    """Load an SDXL ``.safetensors`` checkpoint with the pipeline configuration of ``base_config``.

    Refused with one line each: a pickle checkpoint (loading runs code), a missing or unreadable file, a
    file that is not an SDXL base checkpoint, and weights that do not fit the configuration (wrong shapes,
    or missing: diffusers would leave those parameters empty).
    """
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    path = Path(path).expanduser()
    _check_file(path)
    source = _config_source(base_config)
    try:
        folder = resolve(source, "base model configuration", "config")
    except HubUnavailableError as exc:
        raise HubUnavailableError(f"{exc} (or give --base-config / base_config= a local diffusers SDXL "
                                  "folder)") from None
    if not (folder / "model_index.json").is_file():
        raise ModelFormatError(f"base model configuration {source} is not a diffusers pipeline folder "
                               "(no model_index.json)")
    try:
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), torch_dtype=torch_dtype,
                                                          local_files_only=True)
    except (ValueError, KeyError, RuntimeError, OSError, SingleFileComponentError) as exc:
        if isinstance(exc, torch.OutOfMemoryError) or "allocate" in str(exc):  # out of memory: not the format
            raise
        raise ModelFormatError(f"base model {path} does not load with the configuration of {source}: "
                               f"{first_line(exc)}") from None
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and any(p.is_meta for p in component.parameters()):
            raise ModelFormatError(f"base model {path} lacks weights of the {name} that the configuration of "
                                   f"{source} has")
    return pipe
