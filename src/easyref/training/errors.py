"""Errors a training user can cause, as subclasses of easyref's one hierarchy.

The command line prints any :class:`~easyref.errors.EasyRefError` as one ``error: ...`` line, so
these only add the names a training script may want to catch.
"""

from __future__ import annotations

from easyref.errors import EasyRefError, InvalidArgumentError, OutputPathError


class DataFormatError(EasyRefError, ValueError):
    """A training data file is not the release's JSON format; the message names the record and why."""


class TrainingDataError(InvalidArgumentError):
    """The data cannot feed training at all (too few records, nothing loadable)."""


class RunMismatchError(OutputPathError):
    """The output folder holds a different run, or a checkpoint that does not fit this run."""
