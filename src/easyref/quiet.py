"""Library chatter (transformers / diffusers info logs, weight-loading bars, deprecation warnings) kept
out of the user's way: a user who asked for an image should see the image's progress, not forty lines
about loading checkpoints. Verbose mode (``-v`` on the command line, or the ``easyref`` logger at
DEBUG in Python) shows it all again.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# Loggers that speak when an optional library is imported, not about the user's work: torchao (its
# GPU kernels cannot load on a CPU machine) and torch's pytree registry (torchao's enums).
IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


def verbose_logging() -> bool:
    """Has the Python user asked for details (``logging.getLogger("easyref").setLevel(logging.DEBUG)``)?"""
    return logging.getLogger("easyref").isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Silence transformers/diffusers logs below error level and their weight-loading progress bars, and
    the import-time warnings of :data:`IMPORT_LOGGERS`.

    The denoising progress bar (plain tqdm inside the diffusers pipeline) stays. Library warnings
    (FutureWarning, DeprecationWarning) are hidden too. Everything is restored afterwards, so the
    caller's logging is left as it was. ``verbose`` keeps it all.
    """
    if verbose:
        yield
        return
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = (transformers_logging, diffusers_logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    loggers = [logging.getLogger(name) for name in IMPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for lib in libraries:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
            for lib, (level, bars) in zip(libraries, saved, strict=True):
                lib.set_verbosity(level)
                if bars:
                    lib.enable_progress_bar()
