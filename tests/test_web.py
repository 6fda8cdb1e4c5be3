"""``easyref demo``: the Gradio page driven in a real headless Chromium, and its backend called directly."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from browser import browser, require
from easyref.web import DemoBackend, launch

from conftest import random_image

WAIT = 120.0  # seconds; a generation on the tiny model takes about one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path, count: int, size: int = 48) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        paths.append(folder / f"ref-{index}.png")
        random_image(size, size, index).save(paths[-1])
    return paths


@pytest.fixture
def counted_pipe(tiny_pipe):
    """The tiny pipeline with its MLLM calls counted (and its cache emptied, so counts start clean)."""
    encoder = tiny_pipe.encoder
    original = encoder.encode
    calls = []

    def encode(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    encoder.encode = encode
    tiny_pipe.clear_cache()
    yield tiny_pipe, calls
    del encoder.encode
    tiny_pipe.clear_cache()


def _until(condition, what: str, timeout: float = WAIT, driver=None):
    """Poll ``condition`` until it is truthy. An element Gradio re-rendered between finding it and reading it
    (stale) only means the page is still changing: poll again."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        time.sleep(0.2)
    shown = "" if driver is None else f"; the page said: {driver.find_element('tag name', 'body').text[-600:]!r}"
    raise AssertionError(f"timed out waiting for {what}{shown}")


def _text(driver, css: str) -> str:
    elements = driver.find_elements("css selector", css)
    return elements[0].text if elements else ""


def _download_links(driver) -> list[str]:
    return [a.get_attribute("href") for a in driver.find_elements("css selector", "#downloads a[href]")]


def test_the_page_generates_downloads_a_sidecar_and_reuses_the_encoding(counted_pipe, tmp_path):
    pipe, calls = counted_pipe
    refs = _files(tmp_path / "refs", 3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    backend = DemoBackend(pipe, tmp_path / "out", model_label="tiny")
    port = _free_port()
    app = launch(backend, port=port, block=False)
    driver = browser(tmp_path / "downloads")
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        upload = _until(lambda: driver.find_elements("css selector", "#references input[type=file]"), "the page")
        upload[0].send_keys("\n".join(str(p) for p in refs))
        _until(lambda: "3 references ready" in _text(driver, "#group-status"), "the group to be checked", driver=driver)
        driver.find_element("css selector", "#prompt textarea").send_keys("a cat")
        driver.find_element("css selector", "#more-settings .label-wrap").click()
        steps = _until(lambda: [e for e in driver.find_elements("css selector", "#steps input[type=number]")
                                if e.is_displayed()], "the settings")[0]
        steps.clear()
        steps.send_keys("3")
        driver.find_element("id", "generate").click()
        links = _until(lambda: len(_download_links(driver)) == 2 and _download_links(driver), "the results",
                       driver=driver)
        after_first = len(calls)

        image_link = next(link for link in links if ".png" in link)
        sidecar_link = next(link for link in links if ".json" in link)
        image = Image.open(io.BytesIO(urllib.request.urlopen(image_link).read()))
        sidecar = json.loads(urllib.request.urlopen(sidecar_link).read())
        assert image.size == (64, 64)
        assert sidecar["seed"] == 0 and sidecar["settings"]["prompt"] == "a cat"
        assert sidecar["settings"]["num_inference_steps"] == 3
        assert [r["name"] for r in sidecar["references"]] == [p.name for p in refs]
        assert sidecar["images"] == [image_link.rsplit("/", 1)[-1]]

        seed = driver.find_element("css selector", "#seed input")
        seed.clear()
        seed.send_keys("5")
        driver.find_element("id", "generate").click()
        _until(lambda: any("seed5" in link for link in _download_links(driver)), "the second result", driver=driver)
        assert len(calls) == after_first  # only the seed changed: the MLLM did not run again
        assert after_first >= 1

        driver.find_element("css selector", "#references input[type=file]").send_keys(str(broken))
        message = _until(lambda: "broken.png" in _text(driver, "#group-status") and _text(driver, "#group-status"),
                         "the broken file's message")
        assert "not an image" in message and "/tmp" not in message and "Traceback" not in driver.page_source
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/").status == 200  # still serving
    finally:
        driver.quit()
        app.close()


def test_backend_refuses_bad_input_with_one_readable_sentence(tiny_pipe, tmp_path):
    backend = DemoBackend(tiny_pipe, tmp_path / "out", model_label="tiny")
    refs = [str(p) for p in _files(tmp_path / "refs", 2)]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (9000, 8000)).save(huge)

    def error(*args) -> str:
        with pytest.raises(gr.Error) as caught:
            backend.generate(*args)
        return caught.value.message

    settings = ("", 1.0, 2, 5.0, 0, 64, 64, 1)
    assert "at least one reference" in error([], None, "x", *settings)
    assert "empty.png" in error([*refs, str(empty)], None, "x", *settings)
    assert "huge.png" in error([str(huge)], None, "x", *settings)
    most = tiny_pipe.config.max_references
    assert f"between 1 and {most}" in error(refs * (most // 2 + 1), None, "x", *settings)
    assert "--" not in error(refs, None, "x", "", 1.0, 2, 5.0, 0, 63, 64, 1)  # Python names, not flags
    assert "scale" in error(refs, None, "x", "", 99.0, 2, 5.0, 0, 64, 64, 1)
    assert "start < end" in error(refs, None, "x", "", 1.0, 2, 5.0, 0, 64, 64, 1, 0.8, 0.2)
    assert "--ref-layers" in error(refs, None, "x", "", 1.0, 2, 5.0, 0, 64, 64, 1, 0.0, 1.0, "styles")
    assert not list((tmp_path / "out").iterdir())  # nothing written for a refused request


def test_backend_sidecar_matches_the_cli_record_and_each_run_gets_its_own_folder(tiny_pipe, tmp_path):
    backend = DemoBackend(tiny_pipe, tmp_path / "out", model_label="tiny")
    refs = [str(p) for p in _files(tmp_path / "refs", 2)]
    negatives = [str(p) for p in _files(tmp_path / "neg", 1)]
    first = backend.generate(refs, negatives, "a dog", "", 0.5, 2, 3.0, 7, 64, 64, 2)
    second = backend.generate(refs, None, "a dog", "", 0.5, 2, 3.0, 7, 64, 64, 1)
    gallery, downloads, status = first
    assert len(gallery) == 2 and all(Image.open(path).size == (64, 64) for path, _ in gallery)
    sidecar = json.loads(Path(downloads[-1]).read_text())
    assert sidecar["images"] == [Path(p).name for p, _ in gallery]
    assert sidecar["settings"]["scale"] == 0.5 and sidecar["seed"] == 7 and "7" in status
    assert sidecar["negative_references"][0]["name"] == "ref-0.png"
    assert {"versions", "device", "dtype", "mllm_dtype"} <= set(sidecar)
    assert Path(second[1][0]).parent != Path(downloads[0]).parent
    # The same settings give the same pixels as the pipeline called directly.
    direct = tiny_pipe([Image.open(p) for p in refs], "a dog", seed=7, num_inference_steps=2, guidance_scale=3.0,
                       scale=0.5, negative_prompt="", height=64, width=64, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(second[0][0][0])), np.asarray(direct))


def test_the_command_serves_the_bundled_model_with_its_example_groups(tmp_path):
    from easyref.hub import bundled_folder

    require(bundled_folder("shapesworld").is_dir(), "the bundled ShapesWorld model is not in this checkout")
    port = _free_port()
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "easyref", "demo", "--port", str(port),
                                   "--output-dir", str(tmp_path / "out")], stdout=out, stderr=subprocess.STDOUT)
    try:
        def config():
            try:
                return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read())
            except OSError:
                assert server.poll() is None, log.read_text()
                return None

        page = _until(config, "the server")
    finally:
        server.terminate()
        server.wait(30)
    text = json.dumps(page)
    assert "shapesworld" in text and "example groups" in text
    captions = sorted((tmp_path / "out" / "examples").glob("*/caption.txt"))
    assert len(captions) == 5 and all(c.read_text().strip() in text for c in captions)


@pytest.mark.parametrize(("argv", "message"), [
    (["demo", "--port", "70000"], "--port must be between 1 and 65535"),
    (["demo", "--model", "no-such-folder"], "no such folder"),
])
def test_the_command_refuses_bad_options_in_one_line(argv, message, capsys):
    from easyref.cli import main

    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error:") and len(err) <= 2  # at most "loading model..."
