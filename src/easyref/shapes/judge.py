"""ShapesWorld's judge: a small CNN that reads a scene's attributes back, and the exact metrics built on it.

The judge IS the metric, so unlike every other ShapesWorld model it trains on ALL attribute
combinations, held-out ones included: a metric that had never seen a red striped star could not
say whether a generator drew one. It trains on fresh renders with the blemishes a small generator's
outputs have (mild blur, noise, slight colour casts, small shifts), so a decent generation is read
correctly, and on negatives it must reject (pure noise, blends of two scenes, heavy blur, two or
more objects, a partly erased object, an empty background), so a blurry or mixed output counts as
wrong instead of a lucky guess::

    images ─ ShapesJudge.classify ─ Judgement (label + probabilities per attribute, clean-scene probability)
           ─ score_judgement(concept, prompt) ─ per image: concept_ok, prompt_ok, both, <attribute>_ok
           ─ summarize_scores ─ means with group-bootstrap 95% intervals (as for MRBench)

An attribute counts as right only if its label is right AND the judge is sure: the label's
probability is at least ``attribute_threshold`` and the clean-scene probability at least
``clean_threshold`` (both in the model's config, both 0.5 by default: the label is more likely than
all the others together, and the image is more likely a clean scene than not). Stricter thresholds
reject more of the negatives but also more decent generations; see :func:`evaluate_judge`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from PIL import Image
from torch import nn
from torch.nn import functional as F

from easyref.bench.metrics import bootstrap_interval
from easyref.errors import InvalidArgumentError, ModelFormatError
from easyref.files import atomic_folder, write_json
from easyref.images import ImageSource, load_image
from easyref.shapes.splits import random_held_out_attributes, random_train_attributes
from easyref.shapes.world import (
    ATTRIBUTES,
    IMAGE_SIZE,
    POSITIONS,
    Attributes,
    Scene,
    clean_scene,
    place,
    random_attributes,
    render,
)
from easyref.training.steps import LoopSettings, step_rng, train

_T = TypeVar("_T")
JudgeImage = ImageSource | np.ndarray   # a PIL image, an image file, or a uint8 (H, W, 3) array

ACCURACY_FILE = "accuracy.json"
SCORE_KEYS = ("concept_ok", "prompt_ok", "both")
# Negative kinds and their shares of a batch's negatives: the subtle ones (a ghost of a second scene,
# a second object, a missing part) get more, since plain noise and empty backgrounds are learned at once.
NEGATIVES = {"noise": 1, "blend": 2, "blur": 1, "crowd": 2, "erased": 3, "empty": 1}

# Full budget: 1800 steps of 64 fresh renders (115k images, ~4 min on 2 cores) reach >= 99.4% per
# attribute on unseen clean renders and ~98-99% on blemished ones (seed 0; see evaluate_judge).
FULL_STEPS = 1800
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
POSITIVE_RATE = 0.7            # the rest of each batch is negatives, drawn by the shares in NEGATIVES
EVAL_POSITIVES = 1000          # per split (training combinations, held-out combinations)
EVAL_NEGATIVES = 200           # per negative kind
_TRAIN_STREAM = 0              # step_rng streams: evaluation draws from one training never uses
_EVAL_STREAM = 1

# A small generator's blemishes (positives keep their labels) versus what no clean scene looks like.
_MILD_BLUR = (0.0, 0.9)        # Gaussian sigma in pixels
_HEAVY_BLUR = (2.5, 4.0)
_MAX_SHIFT = 2                 # pixels; well inside the 18-pixel spacing of the position grid
_GAIN = 0.07                   # per-channel colour gain 1 +- this
_OFFSET = 0.03                 # brightness offset +- this (fraction of full scale)
_NOISE = 0.03                  # sensor-like noise sigma up to this (fraction of full scale)
_BLEND = (0.3, 0.7)            # weight of the first scene in a blend
_WHERE_CHANNELS = 8            # the few channels kept as a map, for the position head


def _world_values() -> dict[str, list[str]]:
    return {name: list(values) for name, values in ATTRIBUTES.items()}


class ShapesJudge(ModelMixin, ConfigMixin):
    """A small CNN (0.22M parameters): 64x64 RGB in, one softmax head per attribute plus a clean-scene logit out.

    Four conv stages with max pooling bring the image to an 8x8 map. Its global max and mean say
    *what* is there wherever it is (shape, colour, ...); a few channels of it are kept as a map and
    flattened, so the position head (and the clean head, counting objects) still sees *where*.
    ``attribute_values`` records the world the judge was trained on; loading a judge into a world
    whose attributes changed is refused rather than silently misreading labels.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, widths: Sequence[int] = (16, 32, 64, 96), hidden: int = 192,
                 attribute_values: Mapping[str, Sequence[str]] | None = None,
                 attribute_threshold: float = 0.5, clean_threshold: float = 0.5) -> None:
        super().__init__()
        world = _world_values()
        if attribute_values is None:
            self.register_to_config(attribute_values=world)
        elif {k: list(v) for k, v in attribute_values.items()} != world:
            raise ModelFormatError("this judge was trained on a ShapesWorld with different attributes; "
                                   "retrain it with 'easyref shapes pretrain judge'")
        for name, value in (("attribute_threshold", attribute_threshold), ("clean_threshold", clean_threshold)):
            if not 0.0 <= value <= 1.0:
                raise InvalidArgumentError(f"{name} must be between 0 and 1, got {value}")
        a, b, c, d = widths

        def stage(inputs: int, outputs: int, pool: bool = True) -> list[nn.Module]:
            # Pooling straight after the convolution, before normalising, runs batch norm and ReLU on a
            # quarter of the pixels (~20% less time per step); max pooling rather than strided
            # convolutions, since strided versions of this size sat at chance on shape far longer.
            return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), *([nn.MaxPool2d(2)] if pool else []),
                    nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*stage(3, a), *stage(a, b), *stage(b, c), *stage(c, d, pool=False))
        self.where = nn.Conv2d(d, _WHERE_CHANNELS, 1)
        self.head = nn.Sequential(nn.Linear(2 * d + _WHERE_CHANNELS * (IMAGE_SIZE // 8) ** 2, hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, sum(len(v) for v in world.values()) + 1))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute (``(N, values)``) and ``"clean"`` (``(N,)``) for ``(N, 3, 64, 64)`` pixels in [0, 1]."""
        # Channels-last runs these small convolutions and poolings ~1.5x faster on CPU (oneDNN).
        maps = self.features((pixels * 2 - 1).contiguous(memory_format=torch.channels_last))
        logits = self.head(torch.cat([maps.amax(dim=(2, 3)), maps.mean(dim=(2, 3)), self.where(maps).flatten(1)], 1))
        sizes = [len(values) for values in ATTRIBUTES.values()]
        parts = torch.split(logits, [*sizes, 1], dim=1)
        return {**dict(zip(ATTRIBUTES, parts[:-1], strict=True)), "clean": parts[-1].squeeze(1)}

    @torch.no_grad()
    def classify(self, images: Sequence[JudgeImage] | np.ndarray, batch_size: int = 256) -> Judgement:
        """Read every image's attributes: PIL images, image files or uint8 ``(H, W, 3)`` arrays (resized to 64x64
        by area averaging if they are another size)."""
        pixels = images_to_tensor(images)
        was_training = self.training
        self.eval()
        try:
            outputs = [self(pixels[start:start + batch_size].to(self.device))
                       for start in range(0, len(pixels), batch_size)]
        finally:
            self.train(was_training)
        attributes = {}
        for name in ATTRIBUTES:
            probabilities = torch.cat([o[name] for o in outputs]).float().softmax(dim=1).cpu().numpy()
            attributes[name] = (probabilities.argmax(axis=1), probabilities)
        clean = torch.cat([o["clean"] for o in outputs]).float().sigmoid().cpu().numpy()
        return Judgement(attributes, clean, self.config.attribute_threshold, self.config.clean_threshold)


@dataclasses.dataclass(frozen=True)
class Judgement:
    """What the judge read off N images.

    ``attributes[name] = (labels (N,), probabilities (N, values))``; ``clean`` is the probability
    that each image is a well-formed single-object scene at all.
    """

    attributes: dict[str, tuple[np.ndarray, np.ndarray]]
    clean: np.ndarray
    attribute_threshold: float
    clean_threshold: float

    def __len__(self) -> int:
        return len(self.clean)

    def confident(self, name: str) -> np.ndarray:
        """Is the judge sure of its ``name`` label (and of the scene being clean) on each image?"""
        labels, probabilities = self.attributes[name]
        sure = probabilities[np.arange(len(labels)), labels] >= self.attribute_threshold
        return sure & (self.clean >= self.clean_threshold)

    def correct(self, name: str, value: int | np.ndarray) -> np.ndarray:
        """Per image: is ``name`` read as ``value`` (one index, or one per image) with confidence?

        An unsure right label counts as wrong.
        """
        if name not in ATTRIBUTES:
            raise InvalidArgumentError(f"unknown attribute {name!r}; expected one of {', '.join(ATTRIBUTES)}")
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.integer) or not np.all((value >= 0) & (value < len(ATTRIBUTES[name]))):
            raise InvalidArgumentError(f"{name} must be an index below {len(ATTRIBUTES[name])}, got {value!r}")
        return (self.attributes[name][0] == value) & self.confident(name)


def _as_array(image: JudgeImage) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        image = np.asarray(load_image(image))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidArgumentError(f"the judge reads uint8 RGB images of shape (H, W, 3), got "
                                   f"{image.dtype} {image.shape}")
    if image.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        # Area averaging, like the renderer's own 2x2 supersampling.
        image = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
    return image


def images_to_tensor(images: Sequence[JudgeImage] | np.ndarray) -> torch.Tensor:
    """Images (one ``(N, H, W, 3)`` uint8 array or a sequence of images) → ``(N, 3, 64, 64)`` floats in [0, 1]."""
    if len(images) == 0:
        raise InvalidArgumentError("no images to judge")
    stacked = np.stack([_as_array(image) for image in images])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 255.0


# -- metrics ------------------------------------------------------------------------------------

def score_judgement(judgement: Judgement, concept_attrs: Mapping[str, int],
                    prompt_attrs: Mapping[str, int]) -> list[dict[str, bool]]:
    """Per image: ``concept_ok`` (every attribute the group shares is right), ``prompt_ok`` (every
    attribute the caption names is right), ``both``, and ``<attribute>_ok`` for each attribute named.

    An attribute named by both the concept and the prompt must have the same value in both (the
    image cannot satisfy two values). An empty concept or prompt is vacuously satisfied.
    """
    clash = {name for name in set(concept_attrs) & set(prompt_attrs) if concept_attrs[name] != prompt_attrs[name]}
    if clash:
        raise InvalidArgumentError(f"the concept and the prompt ask for different values of {', '.join(sorted(clash))}")
    named = {**concept_attrs, **prompt_attrs}
    right = {name: judgement.correct(name, value) for name, value in named.items()}
    concept = np.ones(len(judgement), dtype=bool)
    for name in concept_attrs:
        concept &= right[name]
    prompt = np.ones(len(judgement), dtype=bool)
    for name in prompt_attrs:
        prompt &= right[name]
    return [{"concept_ok": bool(concept[i]), "prompt_ok": bool(prompt[i]), "both": bool(concept[i] and prompt[i]),
             **{f"{name}_ok": bool(right[name][i]) for name in ATTRIBUTES if name in right}}
            for i in range(len(judgement))]


def score_images(judge: ShapesJudge, images: Sequence[JudgeImage] | np.ndarray,
                 concept_attrs: Mapping[str, int], prompt_attrs: Mapping[str, int]) -> list[dict[str, bool]]:
    """Judge images made for one concept and prompt (e.g. one group's seeds); see :func:`score_judgement`."""
    return score_judgement(judge.classify(images), concept_attrs, prompt_attrs)


def score_image(judge: ShapesJudge, image: JudgeImage, concept_attrs: Mapping[str, int],
                prompt_attrs: Mapping[str, int]) -> dict[str, bool]:
    return score_images(judge, [image], concept_attrs, prompt_attrs)[0]


def summarize_scores(rows: Sequence[Mapping], seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean and group-bootstrap 95% interval of every score in ``rows`` (each row: ``group_id`` plus scores).

    As for MRBench, a group's images (seeds) are averaged first and groups are resampled, since
    images of one group share references and are not independent. ``<attribute>_ok`` averages only
    over the groups that name that attribute. Each entry: mean, low, high, groups.
    """
    if not rows:
        raise InvalidArgumentError("no scores to summarize")
    groups: dict[str, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(str(row["group_id"]), []).append(row)
    keys = [*SCORE_KEYS, *(f"{name}_ok" for name in ATTRIBUTES)]
    summary = {}
    for key in keys:
        means = np.array([np.mean([float(r[key]) for r in members]) for members in groups.values()
                          if all(key in r for r in members)])
        if len(means) == 0:
            continue
        low, high = bootstrap_interval(means, seed)
        summary[key] = {"mean": float(means.mean()), "low": float(low[0]), "high": float(high[0]),
                        "groups": len(means)}
    return summary


# -- training data ------------------------------------------------------------------------------

def _noise_image(rng: np.random.Generator) -> np.ndarray:
    """Pure noise in three textures: per-pixel, smooth blobs (an untrained generator's look), coloured grain."""
    style = int(rng.integers(3))
    if style == 0:
        return rng.uniform(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3))
    if style == 1:
        cells = int(rng.choice((2, 4, 8)))
        coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
        return smooth + rng.normal(0, 10, smooth.shape)
    return rng.uniform(0, 255, 3) + rng.normal(0, rng.uniform(20, 80), (IMAGE_SIZE, IMAGE_SIZE, 3))


def _crowd(attributes: Attributes, rng: np.random.Generator) -> Scene:
    """The main object plus one or two more objects in other cells of the grid."""
    cells = rng.permutation([p for p in range(len(POSITIONS)) if p != attributes.position])
    extras = [place(random_attributes(rng).replace(position=int(cell)), rng) for cell in cells[:rng.integers(1, 3)]]
    return Scene(objects=(place(attributes, rng), *extras), background=attributes.background,
                 texture=attributes.texture)


def _erased(attributes: Attributes, rng: np.random.Generator) -> np.ndarray:
    """The scene with the object cut by a line near its centre and the far side painted background."""
    scene = clean_scene(attributes, rng)
    obj = scene.objects[0]
    full = render(scene).astype(np.float32)
    empty = render(Scene(objects=(), background=attributes.background, texture=attributes.texture))
    angle = rng.uniform(0, 2 * math.pi)
    offset = rng.uniform(-0.3, 0.3) * obj.radius
    y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] + 0.5
    gone = (x - obj.cx) * math.cos(angle) + (y - obj.cy) * math.sin(angle) > offset
    full[gone] = empty[gone]
    return full


def _example(kind: str, rng: np.random.Generator, attributes: Attributes) -> tuple[np.ndarray, float]:
    """One raw image (float, 0-255) of ``kind`` ("clean" or a negative) and the blur sigma to apply to it."""
    blur = rng.uniform(*_MILD_BLUR)
    if kind == "clean":
        return render(clean_scene(attributes, rng)), blur
    if kind == "noise":
        return _noise_image(rng), blur
    if kind == "blend":
        weight = rng.uniform(*_BLEND)
        other = render(clean_scene(random_attributes(rng), rng))
        return weight * render(clean_scene(attributes, rng)) + (1 - weight) * other.astype(np.float32), blur
    if kind == "blur":
        return render(clean_scene(attributes, rng)), rng.uniform(*_HEAVY_BLUR)
    if kind == "crowd":
        return render(_crowd(attributes, rng)), blur
    if kind == "erased":
        return _erased(attributes, rng), blur
    if kind == "empty":
        return render(Scene(objects=(), background=attributes.background, texture=attributes.texture)), blur
    raise ValueError(f"unknown example kind {kind!r}")


def _axis_maps(shifts: np.ndarray, sigmas: np.ndarray) -> torch.Tensor:
    """One ``(64, 64)`` matrix per image that shifts by ``shifts`` pixels, then Gaussian-blurs by ``sigmas``.

    Both are linear along each axis with the edge pixel repeated past the border, so the whole
    geometric part of the augmentation is ``maps @ image @ maps.T``: two batched matrix products,
    whatever each image's blur radius.
    """
    n = len(sigmas)
    index = np.arange(IMAGE_SIZE)
    shift = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    shift[np.arange(n)[:, None], index, np.clip(index[None] - shifts[:, None], 0, IMAGE_SIZE - 1)] = 1.0
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets[None] / np.maximum(sigmas, 1e-3)[:, None]) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    blur = np.zeros_like(shift)
    rows = np.arange(n)[:, None]
    for k, offset in enumerate(offsets):
        blur[rows, index[None], np.clip(index + offset, 0, IMAGE_SIZE - 1)[None]] += weights[:, k:k + 1]
    return torch.from_numpy(blur @ shift)


def _augment(raw: np.ndarray, sigmas: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """A small generator's blemishes on raw 0-255 images: shift, blur, colour cast, noise; back to uint8 levels."""
    n = len(raw)
    rows = _axis_maps(rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, n), sigmas)[:, None]
    cols = _axis_maps(rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, n), sigmas)[:, None]
    pixels = rows @ (torch.from_numpy(np.asarray(raw, np.float32)).permute(0, 3, 1, 2) / 255.0) @ cols.transpose(2, 3)
    gains = rng.uniform(1 - _GAIN, 1 + _GAIN, (n, 3, 1, 1))
    offsets = rng.uniform(-_OFFSET, _OFFSET, (n, 1, 1, 1))
    sigma = torch.from_numpy(rng.uniform(0, _NOISE, (n, 1, 1, 1))).float()
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**62)))) * sigma
    pixels = pixels * torch.from_numpy(gains).float() + torch.from_numpy(offsets).float() + noise
    return torch.round(pixels.clamp(0, 1) * 255) / 255


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def _batch(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch: pixels, attribute labels (-1 on negatives, which name nothing) and clean targets.

    Attributes are uniform over ALL combinations: the judge must read held-out ones too.
    """
    shares = np.array(list(NEGATIVES.values()), dtype=float)
    negatives = rng.choice(list(NEGATIVES), size, p=shares / shares.sum())
    kinds = np.where(rng.random(size) < POSITIVE_RATE, "clean", negatives)
    raws, sigmas, labels = [], [], []
    for kind in kinds:
        attributes = random_attributes(rng)
        raw, sigma = _example(str(kind), rng, attributes)
        raws.append(np.asarray(raw, dtype=np.float32))
        sigmas.append(sigma)
        labels.append(attributes.as_tuple() if kind == "clean" else (-1,) * len(ATTRIBUTES))
    pixels = _augment(np.stack(raws), np.array(sigmas), rng)
    return pixels, torch.tensor(labels), torch.from_numpy(kinds == "clean").float()


def _prefetching(make: Callable[[int], _T], pool: ThreadPoolExecutor) -> Callable[[int], _T]:
    """``make`` with each step's result started on ``pool`` while the caller works on the step before.

    Rendering is numpy and the CNN is torch, and both release the GIL in their heavy loops, so on
    two cores the next batch renders while this one trains. Results are still a pure function of
    the step, so a resumed run sees the same batches.
    """
    pending: dict[int, Future[_T]] = {}

    def get(step: int) -> _T:
        future = pending.pop(step, None) or pool.submit(make, step)
        pending.clear()
        pending[step + 1] = pool.submit(make, step + 1)
        return future.result()

    return get


def judge_loss(judge: ShapesJudge, pixels: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per attribute on clean scenes plus binary cross-entropy of the clean-scene head on all."""
    logits = judge(pixels.to(judge.device))
    labels, clean = labels.to(judge.device), clean.to(judge.device)
    loss = F.binary_cross_entropy_with_logits(logits["clean"], clean)
    if (labels[:, 0] >= 0).any():
        loss = loss + sum(F.cross_entropy(logits[name], labels[:, k], ignore_index=-1)
                          for k, name in enumerate(ATTRIBUTES))
    return loss


# -- pretraining and its evaluation -------------------------------------------------------------

def evaluate_judge(judge: ShapesJudge, seed: int = 0, positives: int = EVAL_POSITIVES,
                   negatives: int = EVAL_NEGATIVES) -> dict:
    """Accuracy per attribute on fresh renders (seeds training never draws), and negatives' rejection rates.

    ``accuracy[condition][split][attribute]``: the share read right *and* confidently (what the
    metrics count), for ``clean`` renders and ``augmented`` ones (a generator's blemishes), on
    training combinations (``train``) and held-out combinations (``held_out``).
    ``accepted[condition][split]``: the share passing the clean-scene threshold.
    ``rejected[kind]``: the share of each negative kind that fails it.
    """
    rng = step_rng(seed, 0, _EVAL_STREAM)
    accuracy: dict[str, dict] = {"clean": {}, "augmented": {}}
    accepted: dict[str, dict] = {"clean": {}, "augmented": {}}
    for split, draw in (("train", random_train_attributes), ("held_out", random_held_out_attributes)):
        truth = [draw(rng) for _ in range(positives)]
        raw = np.stack([render(clean_scene(a, rng)) for a in truth])
        augmented = _augment(raw.astype(np.float32), rng.uniform(*_MILD_BLUR, positives), rng)
        for condition, images in (("clean", raw), ("augmented", _to_uint8(augmented))):
            judgement = judge.classify(images)
            accuracy[condition][split] = {
                name: float(judgement.correct(name, np.array([getattr(a, name) for a in truth])).mean())
                for name in ATTRIBUTES}
            accepted[condition][split] = float(np.mean(judgement.clean >= judgement.clean_threshold))
    rejected = {}
    for kind in NEGATIVES:
        examples = [_example(kind, rng, random_attributes(rng)) for _ in range(negatives)]
        images = _augment(np.stack([np.asarray(e[0], np.float32) for e in examples]),
                          np.array([e[1] for e in examples]), rng)
        judgement = judge.classify(_to_uint8(images))
        rejected[kind] = float(np.mean(judgement.clean < judgement.clean_threshold))
    return {"accuracy": accuracy, "accepted": accepted, "rejected": rejected,
            "positives_per_split": positives, "negatives_per_kind": negatives}


def pretrain_judge(output: Path, *, steps: int | None = None, seed: int = 0, progress: bool = True,
                   work_dir: Path | None = None, batch_size: int = BATCH_SIZE,
                   eval_positives: int = EVAL_POSITIVES, eval_negatives: int = EVAL_NEGATIVES) -> dict:
    """Train the judge, evaluate it on fresh renders, and publish ``output`` (model + ``accuracy.json``).

    ``steps=None`` is the full budget (:data:`FULL_STEPS`). Checkpoints and the log go to
    ``work_dir`` (default ``output/../work/judge``), so rerunning the command resumes. Returns the
    summary: training numbers, size and the accuracy table of :func:`evaluate_judge`.
    """
    output = Path(output)
    steps = FULL_STEPS if steps is None else steps
    work_dir = Path(work_dir) if work_dir is not None else output.parent / "work" / "judge"
    torch.manual_seed(seed)
    judge = ShapesJudge()

    settings = LoopSettings(steps=steps, learning_rate=LEARNING_RATE, seed=seed, weight_decay=1e-4)
    with ThreadPoolExecutor(1) as pool:
        batch = _prefetching(lambda step: _batch(step_rng(seed, step, _TRAIN_STREAM), batch_size), pool)
        trained = train("judge", judge, lambda step: judge_loss(judge, *batch(step)), settings, work_dir,
                        progress=progress)
    began = time.perf_counter()
    table = evaluate_judge(judge, seed, eval_positives, eval_negatives)
    parameters = sum(p.numel() for p in judge.parameters())
    summary = {**trained, **table, "parameters": parameters, "fp16_megabytes": parameters * 2 / 1e6,
               "batch_size": batch_size, "seed": seed, "evaluation_seconds": time.perf_counter() - began,
               "attribute_threshold": judge.config.attribute_threshold,
               "clean_threshold": judge.config.clean_threshold}
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(output) as staging:
        judge.save_pretrained(staging)
        write_json(staging / ACCURACY_FILE, summary)
    return summary
