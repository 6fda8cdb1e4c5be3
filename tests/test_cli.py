"""The ``easyref`` command line, run in-process through ``main`` on a tiny model made by ``make-tiny``."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from easyref import cli
from easyref.cli import main

FAST = ["--steps", "2", "--height", "64", "--width", "64"]


def _image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny model (made by the command itself) and reference images; shared by the module."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["make-tiny", str(root / "model")]) == 0
    refs = root / "refs"
    refs.mkdir()
    _image(refs / "a.png", 64, 48, 1)
    _image(refs / "b.jpg", 40, 90, 2)
    _image(root / "single.png", 50, 50, 3)
    (root / "empty").mkdir()
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "garbage.safetensors").write_bytes(os.urandom(512))
    save_file({"embeds": torch.zeros(1, 4, 7), "negative_embeds": torch.zeros(1, 4, 7)},
              str(root / "wrong_dims.safetensors"))
    save_file({"something": torch.zeros(1, 4, 64)}, str(root / "no_keys.safetensors"))
    no_mllm = root / "no_mllm"
    no_mllm.mkdir()
    for part in ("base", "adapter"):
        (no_mllm / part).symlink_to(root / "model" / part)
    save_file({"embeds": torch.full((1, 4, 64), float("nan")), "negative_embeds": torch.zeros(1, 4, 64)},
              str(root / "nan.safetensors"))
    save_file({"embeds": torch.zeros(1, 0, 64), "negative_embeds": torch.zeros(1, 4, 64)},
              str(root / "no_tokens.safetensors"))
    nan_model = root / "nan_model"  # a diverged run's adapter: one NaN in the projection
    nan_model.mkdir()
    for part in ("base", "mllm"):
        (nan_model / part).symlink_to(root / "model" / part)
    shutil.copytree(root / "model" / "adapter", nan_model / "adapter")
    state = load_file(str(nan_model / "adapter" / "model.safetensors"))
    state["projection.2.weight"][0, 0] = float("nan")
    save_file(state, str(nan_model / "adapter" / "model.safetensors"))
    return root


def _generate(work: Path, output: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(work / "model"), *FAST, "--output", str(output), *extra]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_make_tiny_writes_a_complete_model(work):
    assert sorted(p.name for p in (work / "model").iterdir()) == ["adapter", "base", "mllm"]
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_generate_writes_image_and_sidecar(work, tmp_path, capsys):
    ref = work / "single.png"
    out = tmp_path / "out.png"
    assert main(_generate(work, out, "--ref", str(ref), "--prompt", "a red cube", "--seed", "7")) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["images"] == ["out.png"]
    assert sidecar["seed"] == 7
    settings = sidecar["settings"]
    assert (settings["seed"], settings["num_inference_steps"], settings["height"], settings["width"]) == (7, 2, 64, 64)
    assert (settings["prompt"], settings["guidance_scale"], settings["scale"]) == ("a red cube", 5.0, 1.0)
    assert sidecar["references"] == [{"path": str(ref), "sha256": _sha(ref)}]
    assert sidecar["versions"]["torch"] != "not installed"
    assert {"easyref", "diffusers", "transformers", "python"} <= set(sidecar["versions"])
    assert "--seed 7" in sidecar["command"] and sidecar["command"].startswith("easyref generate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.png"]


def test_same_seed_same_pixels(work, tmp_path):
    args = ("--ref", str(work / "single.png"), "--prompt", "a cat", "--seed", "3")
    assert main(_generate(work, tmp_path / "a.png", *args)) == 0
    assert main(_generate(work, tmp_path / "b.png", *args)) == 0
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))


def test_encode_then_generate_from_embeds_matches_references(work, tmp_path, capsys):
    refs = work / "refs"
    embeds = tmp_path / "group.safetensors"
    assert main(["encode", "--model", str(work / "model"), "--ref", str(refs), "--prompt", "a dog",
                 "--output", str(embeds)]) == 0
    assert main(_generate(work, tmp_path / "from_embeds.png", "--embeds", str(embeds))) == 0  # file's prompt
    assert main(_generate(work, tmp_path / "from_refs.png", "--ref", str(refs), "--prompt", "a dog")) == 0
    assert np.array_equal(_pixels(tmp_path / "from_embeds.png"), _pixels(tmp_path / "from_refs.png"))
    sidecar = json.loads((tmp_path / "from_embeds.json").read_text())
    assert sidecar["embeds"]["sha256"] == _sha(embeds)
    assert sidecar["settings"]["prompt"] == "a dog"
    assert [r["path"] for r in sidecar["embeds"]["metadata"]["references"]] == [
        str(refs / "a.png"), str(refs / "b.jpg")]


def test_negative_prompt_default_is_the_models_and_embeds_keep_an_explicit_one(work, tmp_path):
    """No --negative-prompt: the adapter's default (the release's text), recorded in the sidecar; an
    embeds file stores a negative prompt only when one was given, and "" stays "" (no negative text)."""
    from easyref.config import RELEASE_NEGATIVE_PROMPT

    refs = work / "refs"
    for name, extra in (("default", []), ("empty", ["--negative-prompt", ""])):
        embeds = tmp_path / f"{name}.safetensors"
        assert main(["encode", "--model", str(work / "model"), "--ref", str(refs), "--prompt", "a dog",
                     "--output", str(embeds), *extra]) == 0
        assert main(_generate(work, tmp_path / f"{name}.png", "--embeds", str(embeds))) == 0
    assert main(_generate(work, tmp_path / "refs.png", "--ref", str(refs), "--prompt", "a dog")) == 0
    settings = {name: json.loads((tmp_path / f"{name}.json").read_text())["settings"]
                for name in ("default", "empty", "refs")}
    assert settings["default"]["negative_prompt"] == settings["refs"]["negative_prompt"] == RELEASE_NEGATIVE_PROMPT
    assert settings["empty"]["negative_prompt"] == ""
    assert np.array_equal(_pixels(tmp_path / "default.png"), _pixels(tmp_path / "refs.png"))
    assert not np.array_equal(_pixels(tmp_path / "default.png"), _pixels(tmp_path / "empty.png"))


def test_folder_reference_and_several_images(work, tmp_path):
    out = tmp_path / "many.png"
    assert main(_generate(work, out, "--ref", str(work / "refs"), "--prompt", "x", "--num-images", "2")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.json", "many_0.png", "many_1.png"]
    sidecar = json.loads((tmp_path / "many.json").read_text())
    assert sidecar["images"] == ["many_0.png", "many_1.png"]
    assert [Path(r["path"]).name for r in sidecar["references"]] == ["a.png", "b.jpg"]


BAD_GENERATE = {
    "missing ref": (["--ref", "{w}/nothere.png", "--prompt", "x"], 1, "nothere.png: file not found"),
    "corrupt ref": (["--ref", "{w}/corrupt.png", "--prompt", "x"], 1, "corrupt.png"),
    "zero refs": (["--ref", "{w}/empty", "--prompt", "x"], 1, "no image files"),
    "height": (["--ref", "{w}/single.png", "--prompt", "x", "--height", "65"], 1, "height must be a multiple of 8"),
    "nan scale": (["--ref", "{w}/single.png", "--prompt", "x", "--scale", "nan"], 1, "scale must be a finite"),
    "negative scale": (["--ref", "{w}/single.png", "--prompt", "x", "--scale", "-1"], 1, "scale must be"),
    "steps not int": (["--ref", "{w}/single.png", "--prompt", "x", "--steps", "two"], 2, "invalid int value"),
    "negative steps": (["--ref", "{w}/single.png", "--prompt", "x", "--steps", "-3"], 1,
                       "--steps must be between 1 and 1000, got -3"),
    "guidance": (["--ref", "{w}/single.png", "--prompt", "x", "--guidance-scale", "-1"], 1,
                 "--guidance-scale must be a finite number"),
    "ref and embeds": (["--ref", "{w}/single.png", "--embeds", "{w}/wrong_dims.safetensors"], 2,
                       "one of --ref, --example or --embeds"),
    "garbage embeds": (["--embeds", "{w}/garbage.safetensors"], 1, "not a safetensors file"),
    "embeds keys": (["--embeds", "{w}/no_keys.safetensors"], 1, "has no 'embeds' or 'negative_embeds'"),
    # fails after the model is loaded, inside the pipeline: still nothing written
    "embeds dims": (["--embeds", "{w}/wrong_dims.safetensors"], 1, "(1, tokens >= 1, 64)"),
    "nan embeds": (["--embeds", "{w}/nan.safetensors"], 1, "embeds hold NaN or infinite values"),
    "no-token embeds": (["--embeds", "{w}/no_tokens.safetensors"], 1, "(1, tokens >= 1, 64)"),
    "nan adapter": (["--ref", "{w}/single.png", "--prompt", "x", "--model", "{w}/nan_model"], 1,
                    "tensor projection.2.weight holds NaN or infinite values"),
    "huge prompt": (["--ref", "{w}/single.png", "--prompt", "x" * 100_000], 1,
                    "--prompt has 100000 characters; at most 2000"),
    "huge scale": (["--ref", "{w}/single.png", "--prompt", "x", "--scale", "1e308"], 1,
                   "--scale must be a finite number between 0 and 10.0, got 1e+308"),
    "huge guidance": (["--ref", "{w}/single.png", "--prompt", "x", "--guidance-scale", "1e308"], 1,
                      "--guidance-scale must be a finite number between 0 and 50.0"),
    "no mllm": (["--ref", "{w}/single.png", "--prompt", "x", "--model", "{w}/no_mllm"], 1, "has no mllm/"),
    "no suffix": (["--ref", "{w}/single.png", "--prompt", "x", "--output", "{o}/noext"], 1, "image format"),
}


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_bad_generate_input_gives_one_error_line_and_writes_nothing(work, tmp_path, capsys, case):
    extra, code, message = BAD_GENERATE[case]
    extra = [arg.format(w=work, o=tmp_path) for arg in extra]
    assert main(_generate(work, tmp_path / "out.png", *extra)) == code
    captured = capsys.readouterr()
    assert message in _one_error_line(captured.err)
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_output_in_missing_folder(work, tmp_path, capsys):
    out = tmp_path / "missing" / "out.png"
    assert main(_generate(work, out, "--ref", str(work / "single.png"), "--prompt", "x")) == 1
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_no_partial_files(work, tmp_path, capsys, monkeypatch):
    calls = []

    def save_then_fail(image, path, fmt):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        image.save(path, format=fmt)

    monkeypatch.setattr(cli, "_save_image", save_then_fail)
    args = ("--ref", str(work / "single.png"), "--prompt", "x", "--num-images", "2")
    assert main(_generate(work, tmp_path / "out.png", *args)) == 1
    assert "unexpected OSError: disk full" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
    calls.clear()

    def disk_full(image, path, fmt):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cli, "_save_image", disk_full)
    assert main(_generate(work, tmp_path / "out.png", *args)) == 1
    assert "error: no space left on the disk writing" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_make_tiny_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["make-tiny", str(tmp_path)]) == 1
    assert "not empty" in _one_error_line(capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_make_tiny_creates_missing_parent_folders(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "a" / "b" / "model")]) == 0
    assert sorted(p.name for p in (tmp_path / "a" / "b" / "model").iterdir()) == ["adapter", "base", "mllm"]
    (tmp_path / "file").write_text("x")
    assert main(["make-tiny", str(tmp_path / "file" / "model")]) == 1
    assert "cannot create output folder" in _one_error_line(capsys.readouterr().err)


def test_encode_rejects_bad_reference_before_loading(work, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert main(["encode", "--model", str(work / "model"), "--ref", str(work / "corrupt.png"),
                 "--prompt", "x", "--output", str(out)]) == 1
    captured = capsys.readouterr()
    assert "corrupt.png" in _one_error_line(captured.err)
    assert "loading model" not in captured.err
    assert list(tmp_path.iterdir()) == []


def test_convert_bad_checkpoint(work, tmp_path, capsys):
    args = ["convert", "--official", str(work / "garbage.safetensors"), "--model", str(work / "model"),
            "--output", str(tmp_path / "adapter")]
    assert main(args) == 1
    assert "garbage.safetensors" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_convert_release_checkpoint(work, tmp_path, capsys):
    from safetensors.torch import load_file

    from easyref.official import export_official_layout
    from easyref.pipeline import EasyRefPipeline

    pipe = EasyRefPipeline.from_pretrained(work / "model", device="cpu", torch_dtype="float32")
    checkpoint = tmp_path / "release.safetensors"
    save_file(export_official_layout(pipe, include_mllm=False), str(checkpoint))
    out = tmp_path / "adapter"
    assert main(["convert", "--official", str(checkpoint), "--model", str(work / "model"),
                 "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    converted = load_file(str(out / "model.safetensors"))
    original = load_file(str(work / "model" / "adapter" / "model.safetensors"))
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[key], original[key]) for key in original)


def test_usage_errors_and_exit_paths(capsys, monkeypatch):
    assert main([]) == 2
    assert "COMMAND" in _one_error_line(capsys.readouterr().err)
    assert main(["generate", "--output", "o.png", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in _one_error_line(capsys.readouterr().err)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("easyref ")
    assert main(["generate", "--help"]) == 0
    assert "--guidance-scale" in capsys.readouterr().out

    def interrupted(args, argv):
        raise KeyboardInterrupt

    def broken(args, argv):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_make_tiny", interrupted)
    assert main(["make-tiny", "x"]) == 130
    assert _one_error_line(capsys.readouterr().err) == "error: interrupted"
    monkeypatch.setattr(cli, "cmd_make_tiny", broken)
    assert main(["make-tiny", "x"]) == 1
    assert _one_error_line(capsys.readouterr().err) == (
        "error: unexpected RuntimeError: boom (run with -v for the traceback)")
    assert main(["make-tiny", "x", "-v"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_python_m_easyref_fails_cleanly(work, tmp_path):
    """A real process: bad input gives one error line, no traceback, a non-zero status."""
    command = [sys.executable, "-m", "easyref", *_generate(work, tmp_path / "out.png"),
               "--ref", str(work / "nothere.png"), "--prompt", "x"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "nothere.png: file not found" in _one_error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_embeds_from_another_adapter_are_refused_unless_asked(work, tmp_path, capsys):
    refs, embeds = work / "refs", tmp_path / "group.safetensors"
    assert main(["encode", "--model", str(work / "model"), "--ref", str(refs), "--prompt", "a dog",
                 "--output", str(embeds)]) == 0
    with safe_open(str(embeds), framework="pt") as handle:
        tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
    config = json.loads(metadata["adapter_config"])
    metadata["adapter_config"] = json.dumps({**config, "num_reference_tokens": config["num_reference_tokens"] + 1})
    save_file(tensors, str(embeds), metadata=metadata)
    capsys.readouterr()
    assert main(_generate(work, tmp_path / "x.png", "--embeds", str(embeds))) == 1
    assert "computed with another adapter (num_reference_tokens differ" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert main(_generate(work, tmp_path / "x.png", "--embeds", str(embeds), "--other-model-embeds")) == 0


def test_a_users_json_is_never_replaced_by_the_sidecar_but_ours_is(work, tmp_path, capsys):
    """`--output groups.png` writes groups.json beside it: a groups.json the user made stays untouched."""
    theirs = tmp_path / "groups.json"
    theirs.write_text('{"my": "data"}')
    args = ("--ref", str(work / "single.png"), "--prompt", "a cat")
    assert main(_generate(work, tmp_path / "groups.png", *args)) == 1
    assert "groups.json exists and was not written by easyref" in capsys.readouterr().err
    assert theirs.read_text() == '{"my": "data"}' and not (tmp_path / "groups.png").exists()
    assert main(_generate(work, tmp_path / "mine.png", *args)) == 0
    assert main(_generate(work, tmp_path / "mine.png", *args, "--seed", "5")) == 0  # our own sidecar: replaced
    assert json.loads((tmp_path / "mine.json").read_text())["seed"] == 5


def test_an_empty_reference_path_is_an_error_not_the_current_folder(work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(work / "refs")  # a folder full of images: '' must not mean "all of them"
    assert main(_generate(work, tmp_path / "x.png", "--ref", "", "--prompt", "a cat")) == 1
    assert "reference #1 is an empty path" in capsys.readouterr().err


@pytest.mark.parametrize(("suffix", "format_name"), [(".xbm", "XBM"), (".h5", "HDF5"), (".grib", "GRIB")])
def test_an_output_suffix_pil_cannot_write_in_rgb_is_refused_before_the_model_loads(work, tmp_path, capsys,
                                                                                   suffix, format_name):
    output = tmp_path / f"out{suffix}"
    assert main(_generate(work, output, "--ref", str(work / "refs"), "--prompt", "a cat",
                          "--model", str(tmp_path / "no-such-model"))) == 1
    err = capsys.readouterr().err
    assert f"PIL cannot write an RGB image as {format_name}" in err and "loading model" not in err
    assert not output.exists()
