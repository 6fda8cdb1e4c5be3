"""A real headless Chromium for the tests of web pages (the compare page, the demo app)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def require(available: bool, message: str) -> None:
    """Skip on a developer machine without the browser; fail in CI, where it must be installed."""
    if not available:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(message)


def browser(download_dir: Path):
    """Headless Debian Chromium through its own chromedriver: Selenium Manager never runs (driver path given)."""
    require(CHROMIUM.is_file() and CHROMEDRIVER.is_file(),
            "Debian's chromium and chromium-driver are needed (apt-get install -y chromium chromium-driver)")
    require(importlib.util.find_spec("selenium") is not None, "selenium is needed (pip install -e '.[dev]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return driver
