"""Refresh docs/images/demo.png: the web app on the bundled ShapesWorld model, one example group generated.

    python scripts/demo_screenshot.py [OUTPUT.png]

Serves ``easyref demo``'s page on a free loopback port, clicks the first example group and Generate in
headless Chromium (the tests' browser, ``tests/browser.py``), waits for the image and saves a screenshot.
"""

from __future__ import annotations

import io
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from PIL import Image  # noqa: E402

from browser import browser  # noqa: E402
from easyref.pipeline import EasyRefPipeline  # noqa: E402
from easyref.web import DemoBackend, example_groups, launch  # noqa: E402


def main(output: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="easyref-screenshot-"))
    backend = DemoBackend(EasyRefPipeline.from_pretrained("shapesworld"), work, model_label="shapesworld")
    backend.examples = example_groups(work / "examples")
    app = launch(backend, port=port, block=False)
    driver = browser(work)
    try:
        driver.set_window_size(1300, 1000)
        driver.get(f"http://127.0.0.1:{port}/")
        deadline = time.monotonic() + 60
        examples = "button.gallery-item, .gallery-item"
        while not driver.find_elements("css selector", examples):
            if time.monotonic() > deadline:
                raise SystemExit("the example groups never appeared")
            time.sleep(0.2)
        driver.find_elements("css selector", examples)[0].click()
        while "references ready" not in driver.find_element("id", "group-status").text:
            time.sleep(0.2)
        driver.find_element("id", "generate").click()
        while not driver.find_elements("css selector", "#downloads a[href]"):
            if time.monotonic() > deadline + 120:
                raise SystemExit("no result within three minutes")
            time.sleep(0.2)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(1.0)  # let the gallery finish drawing
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        shot.quantize(128).save(output, optimize=True)  # a palette keeps the README's image small
    finally:
        driver.quit()
        app.close()
    print(output)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "images" / "demo.png")
