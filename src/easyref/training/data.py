"""Training samples from the release's records: augmentations, a seeded sampler and the collate step.

Every random choice for a sample (caption, crop, drops, reference shuffle and truncation, face
box expansion and flip) comes from its own ``random.Random`` seeded by (run seed, epoch,
index). Workers, processes and resumed runs therefore see exactly the same samples, without
depending on any global random state.

A record whose target cannot be read, or none of whose references can, is skipped: the next
record takes its place and the sample counts one skip, which the loop logs. Unreadable
references of a group are dropped and counted the same way.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from easyref.errors import ImageError, InvalidArgumentError
from easyref.images import load_image, release_resize
from easyref.prompting import ReferenceProcessor, unconditional_image
from easyref.training.errors import TrainingDataError
from easyref.training.options import Augmentations
from easyref.training.records import Box, Record, resolve_path

# A run of this many unreadable records in a row means the data (or --image-root) is wrong.
MAX_CONSECUTIVE_FAILURES = 32
LOAD_ERRORS = (ImageError, InvalidArgumentError, OSError)


@dataclasses.dataclass
class Sample:
    record: int
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]: res x res, or about res² pixels with --crop aspect
    references: list[Image.Image]
    caption: str
    time_ids: tuple[int, int, int, int, int, int]  # SDXL: original (h, w), crop (top, left), target (h, w)
    skipped: int = 0  # records that failed to load before this one took their place
    dropped_references: int = 0


def sample_rng(seed: int, epoch: int, index: int, attempt: int = 0) -> random.Random:
    """The one source of randomness for a sample (string seeds hash the same in every process)."""
    return random.Random(f"easyref:{seed}:{epoch}:{index}:{attempt}")


def crop_target(image: Image.Image, resolution: int, rng: random.Random | None) -> tuple[Image.Image, tuple]:
    """Resize the short side to ``resolution`` and crop a square (random with ``rng``, else centred).

    Returns the crop and SDXL's micro-conditioning numbers for it.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    resized = image if (new_w, new_h) == image.size else image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if rng is not None:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    else:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    crop = resized.crop((left, top, left + resolution, top + resolution))
    return crop, (height, width, top, left, resolution, resolution)


def keep_aspect(image: Image.Image, resolution: int) -> tuple[Image.Image, tuple]:
    """The whole image at about ``resolution``² pixels, each side rounded up to a multiple of 64 (the
    release's stage-3 ``adaptive_resize``); SDXL's micro-conditioning gets the true sizes, no crop."""
    width, height = image.size
    scale = resolution / math.sqrt(width * height)
    new_w, new_h = (max(64, math.ceil(side * scale / 64) * 64) for side in (width, height))
    resized = image if (new_w, new_h) == image.size else image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return resized, (height, width, 0, 0, new_h, new_w)


def target_image(image: Image.Image, aug: Augmentations, rng: random.Random) -> tuple[Image.Image, tuple]:
    """The training target for ``aug.crop`` (a resolved one: center, random or aspect) and its time ids."""
    if aug.crop == "aspect":
        return keep_aspect(image, aug.resolution)
    return crop_target(image, aug.resolution, rng if aug.crop == "random" else None)


def face_reference(image: Image.Image, box: Box, rng: random.Random | None, expand: float = 0.49,
                   flip: float = 0.5) -> Image.Image:
    """A square around a face box, each side moved out by a random whole percentage 0..``expand`` of
    the square (the release's 0-49%), flipped with probability ``flip``.

    The square is moved (not cut) to stay inside the image; without ``rng`` it is the plain square.
    """
    width, height = image.size
    x1, y1 = max(0.0, box[0]), max(0.0, box[1])
    x2, y2 = min(float(width), box[2]), min(float(height), box[3])
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise ImageError(f"face box {list(box[:4])} lies outside the {width}x{height} image")
    grow = 1 + 2 * (rng.randint(0, round(expand * 100)) / 100 if rng is not None else 0.0)
    side = min(max(x2 - x1, y2 - y1) * grow, width, height)
    left = min(max((x1 + x2) / 2 - side / 2, 0), width - side)
    top = min(max((y1 + y2) / 2 - side / 2, 0), height - side)
    crop = image.crop((round(left), round(top), round(left + side), round(top + side)))
    if rng is not None and rng.random() < flip:
        crop = ImageOps.mirror(crop)
    return crop


def choose_references(paths: Sequence[str], rng: random.Random, max_references: int,
                      truncate_probability: float) -> list[str]:
    """Shuffle, cap at ``max_references``, then with ``truncate_probability`` keep a random 2..N-1."""
    chosen = list(paths)
    rng.shuffle(chosen)
    chosen = chosen[:max_references]
    if len(chosen) > 2 and rng.random() < truncate_probability:
        chosen = chosen[:rng.randint(2, len(chosen) - 1)]
    return chosen


def choose_drops(rng: random.Random, aug: Augmentations) -> tuple[bool, bool]:
    """(drop the text, drop the references) for classifier-free guidance training."""
    draw = rng.random()
    if draw < aug.drop_text:
        return True, False
    if draw < aug.drop_text + aug.drop_references:
        return False, True
    if draw < aug.drop_text + aug.drop_references + aug.drop_both:
        return True, True
    return False, False


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


class TrainingDataset(Dataset):
    """Map-style dataset over records; an item key is ``(epoch, index)`` (or a bare index, epoch 0)."""

    def __init__(self, records: Sequence[Record], image_root: Path | None, aug: Augmentations, seed: int,
                 allow_absolute: bool = False) -> None:
        self.records = list(records)
        self.image_root = image_root
        self.allow_absolute = allow_absolute
        self.aug = aug
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def path(self, name: str) -> Path:
        return resolve_path(name, self.image_root, self.allow_absolute)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        last_error = ""
        for attempt in range(min(MAX_CONSECUTIVE_FAILURES, len(self.records))):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                return self.load(record, sample_rng(self.seed, epoch, index, attempt), skipped=attempt)
            except LOAD_ERRORS as exc:
                last_error = f"record {record.index}: {exc}"
        raise TrainingDataError(
            f"{min(MAX_CONSECUTIVE_FAILURES, len(self.records))} records in a row could not be loaded "
            f"(last: {last_error}); check the data with 'easyref data check'"
        )

    def load(self, record: Record, rng: random.Random, skipped: int = 0) -> Sample:
        aug = self.aug
        drop_text, drop_refs = choose_drops(rng, aug)
        caption = "" if drop_text else rng.choice(record.captions)
        image = load_image(self.path(record.target))
        crop, time_ids = target_image(image, aug, rng)
        dropped = 0
        if drop_refs:
            references = [unconditional_image()]
        elif record.kind == "single":
            references = [crop]  # the shared crop: reference and target show the same pixels
        elif record.kind == "face":
            references = [face_reference(image, record.face(), rng, aug.face_expand, aug.face_flip)]
        else:
            references = []
            chosen = choose_references(record.references, rng, aug.max_references, aug.truncate_probability)
            for name in chosen:
                try:
                    references.append(release_resize(load_image(self.path(name))))
                except LOAD_ERRORS:
                    dropped += 1
            if not references:
                raise ImageError(f"none of its {len(chosen)} references could be read")
        references = [release_resize(ref) for ref in references]
        return Sample(record.index, to_tensor(crop), references, caption, time_ids, skipped, dropped)


def validation_example(record: Record, image_root: Path | None, resolution: int, max_references: int,
                       allow_absolute: bool = False) -> tuple[list[Image.Image], str, Image.Image]:
    """Fixed (references, caption, target crop) for a record: no randomness, first caption."""
    image = load_image(resolve_path(record.target, image_root, allow_absolute))
    crop, _ = crop_target(image, resolution, None)
    if record.kind == "single":
        references = [crop]
    elif record.kind == "face":
        references = [face_reference(image, record.face(), None)]
    else:
        references = [load_image(resolve_path(name, image_root, allow_absolute))
                      for name in record.references[:max_references]]
    return references, record.captions[0], crop


class EpochSampler(Sampler):
    """This process's share of a seeded permutation per epoch, as ``(epoch, index)`` keys.

    Like ``DistributedSampler(drop_last=True)``: every process gets ``len(dataset) //
    num_processes`` items, so all processes run the same number of steps, and epoch ``e`` is the
    same permutation on every run with the same seed (what makes resuming exact).
    """

    def __init__(self, size: int, num_processes: int, rank: int, seed: int) -> None:
        self.size, self.num_processes, self.rank, self.seed = size, num_processes, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.num_processes

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()[: len(self) * self.num_processes]
        return iter([(self.epoch, index) for index in order[self.rank::self.num_processes]])


class Collator:
    """Batch samples: MLLM inputs through the encoder's processor, SDXL targets and micro-conditioning."""

    def __init__(self, processor: ReferenceProcessor) -> None:
        self.processor = processor

    def __call__(self, samples: Sequence[Sample]) -> dict:
        sizes = {tuple(s.pixels.shape[1:]) for s in samples}
        if len(sizes) > 1:
            raise TrainingDataError(
                f"targets of different sizes in one batch ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))}): "
                "--crop aspect keeps each image's aspect ratio, so use --batch-size 1 (the release's) or "
                "--crop center")
        return {
            "mllm": self.processor.rows([s.references for s in samples], [s.caption for s in samples]),
            "pixels": torch.stack([s.pixels for s in samples]),
            "time_ids": torch.tensor([s.time_ids for s in samples], dtype=torch.float32),
            "captions": [s.caption for s in samples],
            "records": [s.record for s in samples],
            "skipped": sum(s.skipped for s in samples),
            "dropped_references": sum(s.dropped_references for s in samples),
        }
