"""Library chatter kept out of the user's way, and the caller's logging left as it was."""

from __future__ import annotations

import logging

from easyref.quiet import IMPORT_LOGGERS, quiet_libraries


def test_import_time_warnings_are_hidden_unless_verbose_and_levels_restored(caplog):
    caplog.set_level(logging.WARNING)
    before = {name: logging.getLogger(name).level for name in IMPORT_LOGGERS}
    with quiet_libraries():
        logging.getLogger("torchao").warning("Failed to load a GPU kernel")
        assert all(logging.getLogger(name).level == logging.ERROR for name in IMPORT_LOGGERS)
    assert "Failed to load" not in caplog.text
    assert {name: logging.getLogger(name).level for name in IMPORT_LOGGERS} == before
    with quiet_libraries(verbose=True):
        logging.getLogger("torchao").warning("Failed to load a GPU kernel")
    assert "Failed to load a GPU kernel" in caplog.text
