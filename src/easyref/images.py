"""Loading and validating reference images: the one place a path or PIL image becomes pixels.

Everything that reads a user's image goes through :func:`load_image`, so every caller gets the
same guarantees: a fully decoded 8-bit RGB image in display orientation, or an
:class:`~easyref.errors.ImageError` whose one-line message names the file and the problem. PIL's
own exceptions never reach the user; they are mapped here (``raise ... from None``) because a
PIL traceback says nothing about which of 40 reference files was bad.

:func:`release_resize` reproduces the resize the EasyRef release applies before the Qwen2-VL
image processor, so encodings match the released checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from easyref.errors import ImageError, InvalidArgumentError

# Refuse images above this many pixels (about 8000x8000). A tiny compressed file can claim a
# huge size (a "decompression bomb") and exhaust memory when decoded, so the check runs on the
# size in the file header, before any pixel data is decoded. 64 MP is far above anything the
# encoder uses (references are resized to a few hundred pixels a side), and below PIL's own
# warning threshold, so PIL's DecompressionBombWarning/Error normally never fire first; when
# they do (e.g. if this limit was raised) they are mapped to the same error.
MAX_IMAGE_PIXELS: int = 64_000_000

# Suffixes picked up when a folder is given as a reference (compared lower-cased).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# The release's helper (qwen_vl_utils 0.0.8, fetch_image) resizes with these bounds: each side a
# multiple of the ViT patch (14) times the 2x2 merge, between 4 and 16384 merged patches.
RELEASE_FACTOR = 28
RELEASE_MIN_PIXELS = 4 * 28 * 28
RELEASE_MAX_PIXELS = 16384 * 28 * 28
RELEASE_MAX_ASPECT_RATIO = 200

ImageSource = str | os.PathLike | Image.Image

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255, 255)
_log = logging.getLogger(__name__)


def _label(source: ImageSource) -> str:
    """What error messages call ``source``: the path as given, or the file an image came from."""
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", "") or ""
        return str(filename) if filename else "in-memory image"
    return os.fsdecode(source)


def _too_large(label: str, size: tuple[int, int] | None = None) -> ImageError:
    if size is None:
        return ImageError(f"{label}: image is too large (over the {MAX_IMAGE_PIXELS:,}-pixel limit)")
    w, h = size
    return ImageError(
        f"{label}: image is too large ({w}x{h} = {w * h:,} pixels; the limit is {MAX_IMAGE_PIXELS:,})"
    )


def _check_size(label: str, size: tuple[int, int]) -> None:
    """Refuse empty and oversized images using only the header size (no pixels decoded yet)."""
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{label}: image has no pixels ({w}x{h}); file is truncated or corrupt")
    if w * h > MAX_IMAGE_PIXELS:
        raise _too_large(label, size)


def _decode(image: Image.Image, label: str) -> Image.Image:
    """Size-check, decode every pixel, apply EXIF orientation; return a detached image.

    ``load()`` is what actually reads the pixel data: ``Image.open`` only parses the header.
    With PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` at its default False (this module never sets
    it), a file that ends early raises here instead of being silently padded with grey.
    """
    _check_size(label, image.size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(label, image.size) from None
    except MemoryError:
        raise ImageError(f"{label}: not enough memory to decode the image") from None
    except Exception:  # PIL decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"{label}: file is truncated or corrupt") from None
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        raise ImageError(f"{label}: EXIF metadata is corrupt (cannot read the orientation)") from None


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float grayscale image to 8-bit ``L``.

    PIL's own ``convert("L")`` clips these to 0..255, which turns almost every 16-bit image
    white; instead the value range is mapped linearly:

    * ``I;16*`` and ``I`` are taken as 16-bit data (0..65535, how PNG/TIFF 16-bit files
      arrive): divide by 257 so 65535 -> 255 and 32896 -> 128. ``I`` values outside 0..65535
      are clipped.
    * ``F`` has no standard range: values within 0..1 are scaled by 255, values within 0..255
      are kept, anything larger is taken as 16-bit. NaN becomes 0.
    """
    data = np.asarray(image)
    if image.mode == "F":
        data = np.nan_to_num(data.astype(np.float64), nan=0.0, posinf=65535.0, neginf=0.0)
        peak = float(data.max()) if data.size else 0.0
        if peak <= 1.0:
            data = data * 255.0
        elif peak > 255.0:
            data = data / 257.0
    else:
        data = np.clip(data.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(data), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; always returns a new image.

    Images with transparency (an alpha band, or a palette/tRNS transparent colour) are
    composited onto WHITE rather than having the alpha dropped: the RGB stored under a fully
    transparent pixel is arbitrary (often black, sometimes leftover colours), so dropping alpha
    shows garbage the author never saw. White matches how viewers and most training data
    present such images (logos, product cut-outs).
    """
    mode = image.mode
    try:
        if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
            return _to_8bit_gray(image).convert("RGB")
        if mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, _WHITE)
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")  # RGB (a copy), L, 1, P, CMYK, YCbCr, ...
    except (ValueError, OSError):
        raise ImageError(f"{label}: colour mode {mode} cannot be converted to RGB") from None


def load_image(source: ImageSource) -> Image.Image:
    """Load ``source`` (a path or a PIL image) as a fully decoded 8-bit RGB image.

    Paths and already-open PIL images get the same treatment: pixel-count limit
    (:data:`MAX_IMAGE_PIXELS`, checked before decoding), full decode, EXIF orientation applied,
    then conversion to RGB (transparency composited onto white, 16-bit/float grayscale scaled to
    8 bit, CMYK/palette/1-bit/L converted by PIL). The result is always a new image, detached
    from any file, so the caller's image is never modified.

    Raises :class:`ImageError` with a single-line message naming the file for a missing path, a
    folder, an empty, truncated or corrupt file, an unsupported format or an oversized image.
    """
    if isinstance(source, Image.Image):
        label = _label(source)
        return _to_rgb(_decode(source, label), label)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or a PIL image, got {type(source).__name__}")
    label = _label(source)
    path = Path(label)
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError(f"{label}: file not found") from None
    except PermissionError:
        raise ImageError(f"{label}: permission denied") from None
    except OSError as exc:  # name too long, I/O error, ...
        raise ImageError(f"{label}: cannot access file ({exc.strerror or exc})") from None
    except ValueError:  # a NUL byte in the path
        raise ImageError(f"{label!r}: not a valid file path") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{label}: is a folder, expected an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{label}: not a regular file")
    if info.st_size == 0:
        raise ImageError(f"{label}: file is empty")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(label) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{label}: not an image, or a format PIL cannot read (corrupt or unsupported file)"
        ) from None
    except PermissionError:
        raise ImageError(f"{label}: permission denied") from None
    except MemoryError:
        raise ImageError(f"{label}: not enough memory to read the image header") from None
    except Exception:
        raise ImageError(f"{label}: file is truncated or corrupt") from None

    with opened:
        frames = getattr(opened, "n_frames", 1)
        if frames > 1:
            # Said, not silent: an animated reference or a multi-page TIFF is read as its first frame only.
            _log.warning("%s: %d frames (animated or multi-page); only the first is used", label, frames)
        return _to_rgb(_decode(opened, label), label)


def _is_image_file(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def expand_references(sources: Sequence[ImageSource]) -> list[str | Image.Image]:
    """Replace each folder in ``sources`` by the image files directly inside it.

    A folder contributes its files whose suffix is in :data:`IMAGE_SUFFIXES` (any case),
    sorted by file name, skipping hidden files and not descending into sub-folders; a folder
    with no such file raises :class:`ImageError`. Every other path is returned as a ``str``
    without being checked (:func:`load_image` validates it) and PIL images pass through as
    they are. A single path or image (not in a list) is accepted as a one-item list, so a bare
    string is never iterated character by character.
    """
    if isinstance(sources, (str, os.PathLike, Image.Image)):
        sources = [sources]
    expanded: list[str | Image.Image] = []
    for index, source in enumerate(sources):
        if isinstance(source, Image.Image):
            expanded.append(source)
            continue
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(
                f"reference #{index + 1} is a {type(source).__name__}, expected a path or a PIL image"
            )
        label = _label(source)
        if not label.strip():  # Path("") is ".": an empty --ref would silently mean the current folder
            raise ImageError(f"reference #{index + 1} is an empty path")
        folder = Path(label)
        if not folder.is_dir():
            expanded.append(label)
            continue
        try:
            files = sorted((p for p in folder.iterdir() if _is_image_file(p)), key=lambda p: p.name)
        except OSError as exc:
            raise ImageError(f"{label}: cannot list folder ({exc.strerror or exc})") from None
        if not files:
            raise ImageError(
                f"{label}: folder has no image files ({' '.join(IMAGE_SUFFIXES)})"
            )
        expanded.extend(str(p) for p in files)
    return expanded


def load_references(sources: Sequence[ImageSource], max_references: int) -> list[Image.Image]:
    """Expand folders, check the count is within 1..``max_references``, then load each image.

    The count is checked before any image is decoded, so a wrong folder fails fast; each image's
    aspect ratio is checked here too (the release's limit of 200), so the file is named before any
    model loads. Raises :class:`InvalidArgumentError` for a bad count and :class:`ImageError` for a
    bad file.
    """
    items = expand_references(sources)
    if not 1 <= len(items) <= max_references:
        raise InvalidArgumentError(
            f"got {len(items)} reference images; give between 1 and {max_references}"
        )
    images = []
    for item in items:
        image = load_image(item)
        width, height = image.size
        if _too_elongated(width, height):
            label = "an in-memory image" if isinstance(item, Image.Image) else str(item)
            raise ImageError(f"{label}: {width}x{height} has an aspect ratio above the limit of "
                             f"{RELEASE_MAX_ASPECT_RATIO}")
        images.append(image)
    return images


def _too_elongated(width: int, height: int) -> bool:
    """Beyond the release's aspect-ratio limit (it refuses such images)."""
    return max(width, height) / min(width, height) > RELEASE_MAX_ASPECT_RATIO


def _release_size(width: int, height: int) -> tuple[int, int]:
    """Target (width, height) of the release's smart resize, in this module's own words.

    Each side is rounded to the nearest multiple of 28 (Python's ``round``: halves go to the
    even multiple, as in the release), at least 28. If the area then exceeds the maximum, both
    sides are shrunk by the same factor and floored to multiples of 28; if it falls below the
    minimum, both are grown by the same factor and ceiled to multiples of 28.
    """
    f = RELEASE_FACTOR
    if _too_elongated(width, height):
        raise InvalidArgumentError(
            f"image is {width}x{height}: aspect ratio "
            f"{max(width, height) / min(width, height):.1f} is above the limit of "
            f"{RELEASE_MAX_ASPECT_RATIO}"
        )
    new_h = max(f, round(height / f) * f)
    new_w = max(f, round(width / f) * f)
    if new_h * new_w > RELEASE_MAX_PIXELS:
        shrink = math.sqrt(height * width / RELEASE_MAX_PIXELS)
        new_h = math.floor(height / shrink / f) * f
        new_w = math.floor(width / shrink / f) * f
    elif new_h * new_w < RELEASE_MIN_PIXELS:
        grow = math.sqrt(RELEASE_MIN_PIXELS / (height * width))
        new_h = math.ceil(height * grow / f) * f
        new_w = math.ceil(width * grow / f) * f
    return new_w, new_h


def release_resize(image: Image.Image) -> Image.Image:
    """Resize ``image`` the way the EasyRef release does before the Qwen2-VL image processor.

    The release's helper converts to RGB (plain ``convert``: alpha is dropped, not composited;
    pass a :func:`load_image` result to get the white background) and resizes to the smart-resize
    size (multiples of 28, between 4*28*28 and 16384*28*28 pixels) with PIL's *default*
    ``Image.resize`` filter. No ``resample`` argument is passed on purpose: encodings must match
    the released checkpoints, and that default is what they were computed with. An image that
    is already a valid size comes back with identical pixels (as a copy).

    Raises :class:`InvalidArgumentError` for an aspect ratio above 200, as the release does.
    """
    rgb = image.convert("RGB")
    size = _release_size(*rgb.size)
    if size == rgb.size:
        return rgb
    return rgb.resize(size)


def image_sha256(image: Image.Image) -> str:
    """Hex SHA-256 of an image's mode, size and raw pixel bytes: a cache key for its encoding.

    File bytes are not used because the same pixels can come from different files (re-saved
    PNG, different metadata) and in-memory images have no file. Mode and size are included so
    equal byte strings of different shapes never collide.
    """
    digest = hashlib.sha256()
    digest.update(f"{image.mode}\0{image.size[0]}x{image.size[1]}\0".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
