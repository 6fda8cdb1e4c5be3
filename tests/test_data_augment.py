"""The release's augmentations, the seeded sampler and the collate step, on made-up images."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from easyref.errors import InvalidArgumentError
from easyref.images import release_resize
from easyref.training.data import (
    Collator,
    EpochSampler,
    TrainingDataset,
    choose_drops,
    choose_references,
    crop_target,
    face_reference,
    sample_rng,
)
from easyref.training.errors import TrainingDataError
from easyref.training.options import Augmentations
from easyref.training.records import parse_records

NO_DROPS = {"drop_text": 0.0, "drop_references": 0.0, "drop_both": 0.0}


def solid(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), color)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    for name, (w, h) in {"t.png": (100, 80), "a.png": (70, 90), "b.png": (64, 64), "c.png": (90, 60)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    face = solid(120, 100, (0, 0, 255))
    face.paste(solid(30, 40, (255, 0, 0)), (40, 30))  # the "face": a red box at (40, 30)-(70, 70)
    face.paste(solid(8, 40, (255, 255, 0)), (40, 30))  # with a yellow left edge, so a flip shows
    face.save(tmp_path / "face.png")
    (tmp_path / "broken.png").write_bytes((tmp_path / "b.png").read_bytes()[:60])
    return tmp_path


def dataset(root, records, **aug) -> TrainingDataset:
    return TrainingDataset(parse_records(records), root, Augmentations(resolution=64, **aug), seed=7)


def test_caption_drawn_at_random_and_samples_repeat_exactly(images):
    ds = dataset(images, [{"image_file": ["a.png"], "text": ["one", "two", "three"], "target": "t.png"}], **NO_DROPS)
    captions = {ds[(epoch, 0)].caption for epoch in range(30)}
    assert captions == {"one", "two", "three"}
    first, again = ds[(3, 0)], ds[(3, 0)]
    assert first.caption == again.caption and first.time_ids == again.time_ids
    assert np.array_equal(first.pixels.numpy(), again.pixels.numpy())


def test_references_shuffled_capped_and_truncated():
    paths = [f"{i}.png" for i in range(30)]
    kept = [choose_references(paths, random.Random(s), 24, 0.0) for s in range(50)]
    assert all(len(k) == 24 for k in kept) and len({tuple(k) for k in kept}) > 1
    truncated = [len(choose_references(paths[:6], random.Random(s), 24, 1.0)) for s in range(200)]
    assert set(truncated) == {2, 3, 4, 5}  # a random 2..N-1
    sometimes = [len(choose_references(paths[:6], random.Random(s), 24, 0.4)) for s in range(500)]
    assert 0.3 < sum(n < 6 for n in sometimes) / 500 < 0.5
    assert all(len(choose_references(paths[:2], random.Random(s), 24, 1.0)) == 2 for s in range(20))  # N=2: kept


def test_drop_rates_and_the_black_unconditional_image(images):
    aug = Augmentations(resolution=64, drop_text=0.1, drop_references=0.2, drop_both=0.3)
    counts = Counter(choose_drops(random.Random(s), aug) for s in range(4000))
    assert abs(counts[(True, False)] / 4000 - 0.1) < 0.02
    assert abs(counts[(False, True)] / 4000 - 0.2) < 0.03
    assert abs(counts[(True, True)] / 4000 - 0.3) < 0.03
    ds = dataset(images, [{"image_file": ["a.png", "b.png"], "text": ["x"], "target": "t.png"}],
                 drop_text=0.0, drop_references=0.0, drop_both=1.0)
    sample = ds[0]
    assert sample.caption == ""
    assert len(sample.references) == 1 and not np.asarray(sample.references[0]).any()  # all black


def test_single_reference_records_share_the_target_crop(images):
    ds = dataset(images, [{"image_file": ["t.png"], "text": ["x"], "target": "t.png"}], **NO_DROPS)
    sample = ds[0]
    target = ((sample.pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    # the reference is the same 64x64 crop, resized the release's way to multiples of 28
    assert np.array_equal(np.asarray(sample.references[0]), np.asarray(release_resize(Image.fromarray(target))))


def test_release_crops_per_stage_and_aspect_kept_for_groups(images):
    """Stages align/single: a centre square; multi: the whole target at about resolution² pixels with its
    aspect ratio kept (sides rounded up to multiples of 64) and its true size as SDXL's conditioning."""
    from easyref.training.data import keep_aspect
    from easyref.training.options import TrainOptions

    def resolved(stage, **aug):
        return TrainOptions(stage=stage, data=images / "d.json", output=images / "run",
                            augment=Augmentations(resolution=128, **aug)).resolved().augment.crop

    assert [resolved(stage) for stage in ("align", "single", "multi")] == ["center", "center", "aspect"]
    assert resolved("multi", crop="random") == "random"
    with pytest.raises(InvalidArgumentError, match="crop must be one of"):
        Augmentations(crop="square")
    wide, time_ids = keep_aspect(solid(300, 100, (1, 2, 3)), 128)
    # 300x100 at 128² pixels: 221.7 x 73.9, rounded up to multiples of 64
    assert wide.size == (256, 128) and time_ids == (100, 300, 0, 0, 128, 256)
    group = [{"image_file": ["a.png", "b.png"], "text": ["x"], "target": name} for name in ("t.png", "c.png")]
    ds = dataset(images, group, crop="aspect", **NO_DROPS)
    assert tuple(ds[0].pixels.shape) == (3, 64, 64 + 64) and ds[0].time_ids == (80, 100, 0, 0, 64, 128)
    with pytest.raises(TrainingDataError, match="--batch-size 1"):
        Collator(None)([ds[0], dataset(images, group, crop="center", **NO_DROPS)[0]])


def test_sdxl_micro_conditioning_follows_the_crop():
    image = solid(100, 80, (9, 9, 9))
    crops = [crop_target(image, 64, random.Random(s))[1] for s in range(40)]
    for original_h, original_w, top, left, target_h, target_w in crops:
        assert (original_h, original_w, target_h, target_w) == (80, 100, 64, 64)
        assert top == 0 and 0 <= left <= 80 - 64  # short side scaled to 64: 80x64
    assert len({c[3] for c in crops}) > 1  # random left edge
    assert crop_target(image, 64, None)[1] == (80, 100, 0, 8, 64, 64)  # centred without an rng


def test_face_crop_is_a_square_around_the_box_grown_by_whole_percentages_and_flipped_sometimes(images):
    """The release's face reference: the square around the first box, each side moved out by a random
    whole 0..49% of the square (side 40 -> 40 x (1 + 2 p / 100)), flipped half the time."""
    face = Image.open(images / "face.png").convert("RGB")
    box = (40.0, 30.0, 70.0, 70.0, 1.0)
    plain = face_reference(face, box, None)
    assert plain.size == (40, 40)
    red = np.asarray(plain)[..., 0] > 200
    assert red.mean() > 0.7  # mostly the face
    sides, flips = set(), 0
    for seed in range(60):
        crop = face_reference(face, box, random.Random(seed), flip=0.5)
        assert crop.size[0] == crop.size[1]
        sides.add(crop.size[0])
        green = np.asarray(crop)[..., 1].astype(float)
        flips += green[:, : crop.size[0] // 2].mean() < green[:, crop.size[0] // 2:].mean()
    assert min(sides) >= 40 and max(sides) <= round(40 * 1.98) + 1 and len(sides) > 20  # +1: pixel rounding
    assert max(sides) > 70  # up to 49% per side, not the old 25%
    assert all(any(abs(side - 40 * (1 + 2 * p / 100)) <= 1 for p in range(50)) for side in sides)
    assert 10 < flips < 50
    ds = dataset(images, [{"face": [[40, 30, 70, 70, 0.1], [0, 0, 20, 20, 0.9]], "text": ["x"],
                           "target": "face.png"}], face_expand=0.0, **NO_DROPS)
    assert np.asarray(ds[0].references[0])[..., 0].mean() > 100  # the FIRST box's face, not the best-scored


def test_unreadable_records_are_skipped_and_counted(images):
    records = [
        {"image_file": ["a.png"], "text": ["x"], "target": "missing.png"},
        {"image_file": ["a.png", "broken.png", "gone.png"], "text": ["y"], "target": "t.png"},
    ]
    ds = dataset(images, records, truncate_probability=0.0, **NO_DROPS)
    sample = ds[0]
    assert sample.record == 1 and sample.skipped == 1  # record 0 failed, record 1 took its place
    assert sample.dropped_references == 2 and len(sample.references) == 1
    hopeless = dataset(images, [{"image_file": ["a.png"], "text": ["x"], "target": "missing.png"}], **NO_DROPS)
    with pytest.raises(TrainingDataError, match="could not be loaded"):
        hopeless[0]


def test_sampler_shards_a_seeded_permutation_per_epoch():
    shards = [EpochSampler(11, 2, rank, seed=3) for rank in range(2)]
    for shard in shards:
        shard.set_epoch(1)
    first, second = (list(shard) for shard in shards)
    assert len(first) == len(second) == 5
    indices = [i for _, i in first + second]
    assert len(set(indices)) == 10 and {e for e, _ in first} == {1}
    again = EpochSampler(11, 2, 0, seed=3)
    again.set_epoch(1)
    assert list(again) == first
    again.set_epoch(2)
    assert list(again) != first
    assert sample_rng(1, 2, 3).random() == sample_rng(1, 2, 3).random() != sample_rng(1, 2, 4).random()


def test_collate_builds_mllm_inputs_and_sdxl_targets(images, tiny_pipe):
    ds = dataset(images, [{"image_file": ["a.png", "b.png"], "text": ["x"], "target": "t.png"},
                          {"face": [[40, 30, 70, 70]], "text": ["y"], "target": "face.png"}], **NO_DROPS)
    batch = Collator(tiny_pipe.encoder.processor)([ds[0], ds[1]])
    assert batch["pixels"].shape == (2, 3, 64, 64) and -1 <= batch["pixels"].min() and batch["pixels"].max() <= 1
    assert batch["time_ids"].shape == (2, 6)
    assert batch["mllm"]["input_ids"].shape[0] == 2 and batch["mllm"]["image_grid_thw"].shape[0] == 3
    assert batch["captions"] == ["x", "y"] and batch["records"] == [0, 1] and batch["skipped"] == 0
