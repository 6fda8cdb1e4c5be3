"""One error hierarchy for everything a user can get wrong.

The CLI catches :class:`EasyRefError` and prints its message as a single ``error: ...`` line;
API users catch the subclass that matches what they passed in. Every subclass also inherits
from the built-in exception a Python user would expect (``ValueError``, ``FileNotFoundError``),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException) -> str:
    """The first line of a library's message, without terminal colour codes (torch prints some): what a one-line
    error can quote of it."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


class EasyRefError(Exception):
    """Base class: a problem with the user's input, files or environment, never a bug."""


class InvalidArgumentError(EasyRefError, ValueError):
    """A number or option is out of range (scale, height, reference count, ...)."""


class ImageError(EasyRefError, ValueError):
    """An image file is missing, unreadable, truncated, too large or in an unknown format."""


class OutsideRootError(ImageError):
    """A path in a data file leaves the folder its paths are relative to (``../``, or an absolute path
    where none is allowed): easyref must not read, copy or reveal files the user did not point it at."""


class ModelFormatError(EasyRefError, ValueError):
    """A model folder or checkpoint is missing a part or is not in the expected layout."""


class NonFiniteError(EasyRefError, ValueError):
    """NaN or infinite numbers where an image needs finite ones: weights, embeds, tokens or latents.

    Left alone they decode to an all-black image with a success status; the message names the source.
    """


class ShapeMismatchError(ModelFormatError):
    """Weights do not fit the model they are loaded into; the message names both shapes."""


class HubUnavailableError(EasyRefError, OSError):
    """A hub id was given but the hub cannot be reached and nothing is cached locally."""


class OutputPathError(EasyRefError, OSError):
    """An output path cannot be written (missing folder, no permission)."""


class FolderInUseError(OutputPathError):
    """Another easyref process is writing the same output folder (its lock file names it)."""
