"""Tests for easyref.images: loading, validation, folder expansion and the release resize."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from easyref import images
from easyref.errors import EasyRefError, ImageError, InvalidArgumentError
from easyref.images import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    expand_references,
    image_sha256,
    load_image,
    load_references,
    release_resize,
)

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def noise_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """Random RGB pixels: compress badly, so cutting the file in half cuts into pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def assert_user_error(excinfo: pytest.ExceptionInfo, path: str | os.PathLike, *words: str) -> str:
    """The message names the file, is one line, and carries no PIL exception chain."""
    exc = excinfo.value
    message = str(exc)
    assert os.fspath(path) in message
    assert "\n" not in message
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__
    for word in words:
        assert word in message
    return message


# --------------------------------------------------------------------------- failures


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "reference photo.jpg"
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, path, "not found")


def test_missing_parent_is_not_found(tmp_path: Path) -> None:
    parent = save(noise_image(), tmp_path / "a.png")
    path = parent / "b.png"  # a "folder" that is really a file
    with pytest.raises(ImageError) as excinfo:
        load_image(str(path))
    assert_user_error(excinfo, path, "not found")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, path, "empty")


@pytest.mark.parametrize("suffix, fmt", [(".jpg", "JPEG"), (".png", "PNG")])
def test_truncated_file(tmp_path: Path, suffix: str, fmt: str) -> None:
    path = truncate(save(noise_image(), tmp_path / f"cut{suffix}", format=fmt))
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, path, "truncated or corrupt")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never flipped, not even temporarily left on


def test_truncated_open_image_uses_its_filename(tmp_path: Path) -> None:
    path = truncate(save(noise_image(), tmp_path / "cut.png"))
    with Image.open(path) as opened, pytest.raises(ImageError) as excinfo:
        load_image(opened)
    assert_user_error(excinfo, path, "truncated or corrupt")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, path, "not an image")


def test_text_file_renamed_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, path, "not an image")


def test_folder_given_as_file(tmp_path: Path) -> None:
    folder = tmp_path / "refs.png"
    folder.mkdir()
    with pytest.raises(ImageError) as excinfo:
        load_image(folder)
    assert_user_error(excinfo, folder, "folder")


def test_errors_are_value_errors_and_easyref_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(EasyRefError):
        load_image(tmp_path / "missing.png")


def test_wrong_type_is_type_error() -> None:
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- size limit


def test_default_limit() -> None:
    assert MAX_IMAGE_PIXELS == 64_000_000


def test_too_large_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(noise_image(20, 20), tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, path, "too large", "20x20")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 400)
    assert load_image(path).size == (20, 20)


def test_limit_is_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Valid header, truncated pixel data: decoding would fail with "truncated", so a
    # "too large" error proves the check ran on the header size first.
    path = truncate(save(noise_image(), tmp_path / "cut.png"))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, path, "too large")


def test_limit_applies_to_open_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError) as excinfo:
        load_image(Image.new("RGB", (20, 20)))
    assert_user_error(excinfo, "in-memory image", "too large")


@pytest.mark.parametrize("side", [12, 20])  # PIL warns above its limit, raises above twice it
def test_pil_decompression_bomb_maps_to_image_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    path = save(noise_image(side, side), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, path, "too large")


# --------------------------------------------------------------------------- modes


def test_rgb_round_trip_and_copy(tmp_path: Path) -> None:
    source = noise_image()
    path = save(source, tmp_path / "rgb.png")
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.tobytes() == source.tobytes()
    in_memory = load_image(source)
    assert in_memory is not source
    assert in_memory.tobytes() == source.tobytes()


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("GIF", ".gif"), ("BMP", ".bmp")])
def test_palette(tmp_path: Path, fmt: str, suffix: str) -> None:
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    image.putpixel((0, 0), 1)
    image.putpixel((1, 0), 2)
    loaded = load_image(save(image, tmp_path / f"p{suffix}", format=fmt))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == RED
    assert loaded.getpixel((1, 0)) == (0, 0, 255)
    assert loaded.getpixel((2, 0)) == (0, 0, 0)


def test_palette_with_transparency_becomes_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 1)
    path = save(image, tmp_path / "pt.png", transparency=0)  # index 0 (black) is transparent
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == RED
    assert loaded.getpixel((1, 0)) == WHITE


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (3, 1), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    loaded = load_image(save(image, tmp_path / "rgba.png"))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 0)) == RED
    assert all(126 <= c <= 128 for c in loaded.getpixel((2, 0)))


def test_transparent_pixels_with_arbitrary_rgb_become_white() -> None:
    image = Image.new("RGBA", (1, 1), (12, 200, 7, 0))
    assert load_image(image).getpixel((0, 0)) == WHITE


def test_la(tmp_path: Path) -> None:
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (50, 255))
    loaded = load_image(save(image, tmp_path / "la.png"))
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 0)) == (50, 50, 50)


def test_cmyk(tmp_path: Path) -> None:
    colour = (10, 200, 30, 40)
    image = Image.new("CMYK", (2, 2), colour)
    expected = Image.new("CMYK", (1, 1), colour).convert("RGB").getpixel((0, 0))
    loaded = load_image(save(image, tmp_path / "cmyk.tif"))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == expected


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    data = np.array([[65535, 32896, 0, 257]], dtype=np.uint16)
    path = save(Image.fromarray(data), tmp_path / "gray16.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    loaded = load_image(path)
    assert [loaded.getpixel((x, 0)) for x in range(4)] == [
        (255, 255, 255), (128, 128, 128), (0, 0, 0), (1, 1, 1)
    ]


def test_int32_gray_is_sixteen_bit_range() -> None:
    image = Image.fromarray(np.array([[65535, 32896, -5, 100_000]], dtype=np.int32))
    assert image.mode == "I"
    loaded = load_image(image)
    assert [loaded.getpixel((x, 0))[0] for x in range(4)] == [255, 128, 0, 255]


@pytest.mark.parametrize(
    "values, expected",
    [([1.0, 0.5, 0.0], [255, 128, 0]), ([255.0, 128.0, 0.0], [255, 128, 0]),
     ([65535.0, 32896.0, 0.0], [255, 128, 0])],
)
def test_float_gray(values: list[float], expected: list[int]) -> None:
    image = Image.fromarray(np.array([values], dtype=np.float32))
    assert image.mode == "F"
    loaded = load_image(image)
    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == expected


def test_one_bit_and_l(tmp_path: Path) -> None:
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    loaded = load_image(save(one, tmp_path / "one.png"))
    assert loaded.getpixel((0, 0)) == (0, 0, 0)
    assert loaded.getpixel((1, 0)) == WHITE
    gray = load_image(save(Image.new("L", (1, 1), 77), tmp_path / "l.png"))
    assert gray.getpixel((0, 0)) == (77, 77, 77)


def _oriented(width: int, height: int, orientation: int) -> tuple[Image.Image, Image.Exif]:
    image = Image.new("RGB", (width, height), (0, 0, 0))
    for x in range(3):  # a 3x3 red block at the stored top-left corner
        for y in range(3):
            image.putpixel((x, y), RED)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image, exif


def test_exif_orientation_6_png(tmp_path: Path) -> None:
    image, exif = _oriented(20, 10, 6)
    path = save(image, tmp_path / "rotated.png", exif=exif)
    loaded = load_image(path)
    assert loaded.size == (10, 20)
    # Orientation 6: display = stored rotated 90 degrees clockwise; top-left goes to top-right.
    assert loaded.getpixel((9, 0)) == RED
    assert loaded.getpixel((0, 0)) == (0, 0, 0)
    assert loaded.getpixel((9, 19)) == (0, 0, 0)


def test_exif_orientation_6_jpeg_and_open_image(tmp_path: Path) -> None:
    image, exif = _oriented(20, 10, 6)
    path = save(image, tmp_path / "rotated.jpg", exif=exif, quality=100)
    loaded = load_image(path)
    assert loaded.size == (10, 20)
    r, g, b = loaded.getpixel((8, 1))
    assert r > 200 and g < 60 and b < 60
    with Image.open(path) as opened:
        assert load_image(opened).size == (10, 20)


# --------------------------------------------------------------------------- references


def test_image_suffixes() -> None:
    assert set(IMAGE_SUFFIXES) == {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def test_expand_folder_sorted_skipping_non_images(tmp_path: Path) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "c.JPEG", "d.webp"):
        save(noise_image(8, 8), folder / name)
    (folder / "notes.txt").write_text("x")
    save(noise_image(8, 8), folder / ".hidden.png")
    (folder / "sub.png").mkdir()  # a folder with an image suffix
    save(noise_image(8, 8), folder / "sub.png" / "inner.png")  # not descended into
    other = save(noise_image(8, 8), tmp_path / "single.png")
    in_memory = noise_image(8, 8)

    result = expand_references([other, folder, in_memory, "not/checked/yet.png"])
    assert result == [
        str(other),
        str(folder / "a.jpg"), str(folder / "b.png"), str(folder / "c.JPEG"), str(folder / "d.webp"),
        in_memory,
        "not/checked/yet.png",
    ]
    assert result[5] is in_memory


def test_expand_single_path_is_one_item(tmp_path: Path) -> None:
    assert expand_references(str(tmp_path / "x.png")) == [str(tmp_path / "x.png")]  # type: ignore[arg-type]


def test_expand_folder_without_images(tmp_path: Path) -> None:
    folder = tmp_path / "empty refs"
    folder.mkdir()
    (folder / "readme.txt").write_text("x")
    save(noise_image(8, 8), folder / ".hidden.png")
    with pytest.raises(ImageError) as excinfo:
        expand_references([folder])
    assert_user_error(excinfo, folder, "no image files")


def test_load_references(tmp_path: Path) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    save(Image.new("RGBA", (5, 5), (0, 0, 0, 0)), folder / "a.png")
    save(Image.new("L", (6, 4), 9), folder / "b.png")
    loaded = load_references([folder, Image.new("CMYK", (2, 2))], max_references=3)
    assert [im.mode for im in loaded] == ["RGB"] * 3
    assert [im.size for im in loaded] == [(5, 5), (6, 4), (2, 2)]


def test_zero_references() -> None:
    with pytest.raises(InvalidArgumentError) as excinfo:
        load_references([], max_references=128)
    assert str(excinfo.value) == "got 0 reference images; give between 1 and 128"


def test_too_many_references(tmp_path: Path) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    for i in range(3):
        save(noise_image(8, 8), folder / f"{i}.png")
    with pytest.raises(InvalidArgumentError) as excinfo:
        load_references([folder], max_references=2)
    assert str(excinfo.value) == "got 3 reference images; give between 1 and 2"


def test_bad_reference_names_the_file(tmp_path: Path) -> None:
    good = save(noise_image(8, 8), tmp_path / "good.png")
    bad = truncate(save(noise_image(), tmp_path / "bad.jpg"))
    with pytest.raises(ImageError) as excinfo:
        load_references([good, bad], max_references=4)
    assert_user_error(excinfo, bad, "truncated")


# --------------------------------------------------------------------------- release resize


@pytest.mark.parametrize(
    "size, expected",
    [
        ((100, 50), (112, 56)),  # round each side to 28: 3.57 -> 4, 1.79 -> 2
        ((1000, 3000), (1008, 2996)),  # 35.7 -> 36, 107.1 -> 107
        ((10, 10), (56, 56)),  # 28x28 < 4*28*28: grow by sqrt(3136/100) = 5.6, ceil
        ((70, 42), (56, 56)),  # 2.5 and 1.5 both round to 2 (halves to even, like the release)
        ((200, 1), (196, 28)),  # aspect ratio exactly 200 is allowed; height floors at 28
        ((4500, 3000), (4368, 2912)),  # 4508x2996 > 16384*28*28: shrink by 1.02518, floor
    ],
)
def test_release_resize_sizes(size: tuple[int, int], expected: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (10, 20, 30))
    resized = release_resize(image)
    assert resized.size == expected
    assert resized.mode == "RGB"


def test_release_resize_uses_default_filter() -> None:
    image = noise_image(100, 50)
    assert release_resize(image).tobytes() == image.resize((112, 56)).tobytes()


def test_release_resize_keeps_valid_sizes_identical() -> None:
    image = noise_image(336, 336)
    resized = release_resize(image)
    assert resized.size == (336, 336)
    assert resized.tobytes() == image.tobytes()


def test_release_resize_converts_to_rgb() -> None:
    assert release_resize(Image.new("L", (56, 56), 3)).getpixel((0, 0)) == (3, 3, 3)


def test_release_resize_rejects_extreme_aspect_ratio() -> None:
    with pytest.raises(InvalidArgumentError) as excinfo:
        release_resize(Image.new("RGB", (201, 1)))
    assert "aspect ratio" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


# --------------------------------------------------------------------------- hashing


def test_image_sha256() -> None:
    a = noise_image(8, 8)
    assert image_sha256(a) == image_sha256(a.copy())
    assert len(image_sha256(a)) == 64
    b = a.copy()
    b.putpixel((0, 0), (1, 2, 3) if a.getpixel((0, 0)) != (1, 2, 3) else (4, 5, 6))
    assert image_sha256(a) != image_sha256(b)
    # Same bytes, different shape or mode: different keys.
    flat = Image.frombytes("RGB", (16, 4), a.tobytes())
    assert image_sha256(flat) != image_sha256(a)
    gray = Image.frombytes("L", (24, 8), a.tobytes())
    assert image_sha256(gray) != image_sha256(a)


def test_a_too_elongated_reference_is_named_before_any_model_loads(tmp_path: Path) -> None:
    """The release refuses an aspect ratio above 200; the check happens at loading, naming the file."""
    good = save(noise_image(8, 8), tmp_path / "good.png")
    thin = save(Image.new("RGB", (402, 2), "red"), tmp_path / "thin.png")
    with pytest.raises(ImageError) as excinfo:
        load_references([good, thin], max_references=4)
    assert_user_error(excinfo, thin, "402x2 has an aspect ratio above the limit of 200")
    assert len(load_references([save(Image.new("RGB", (400, 2), "red"), tmp_path / "ok.png")], 1)) == 1


def test_an_animated_image_is_read_as_its_first_frame_and_says_so(tmp_path, caplog):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (32, 32), "red").save(tmp_path / "still.gif")
    with caplog.at_level("WARNING", logger="easyref"):
        first = load_image(tmp_path / "anim.gif")
        load_image(tmp_path / "still.gif")
    assert first.getpixel((0, 0)) == (255, 0, 0)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'anim.gif'}: 3 frames (animated or multi-page); only the first is used"]

