"""ShapesWorld's DINO: a small ``Dinov2Model`` trained without labels, for the DINO-I metric.

DINO-I compares a generated image with its target through DINOv2's pooled, layer-normed CLS token
(``pooler_output``). Ours learns that embedding self-supervised, as DINOv2 does, so the metric is
not a disguised attribute classifier: two augmented views of one scene (another pose, a lighting
change, a mild crop, sensor noise, clutter objects, sometimes a small occluder) must embed close
together and apart from every other scene in the batch (SimCLR's InfoNCE, on ``pooler_output``
itself, so the metric reads exactly what was trained). What survives the augmentations is the
scene's identity: its object, its size and place, its background.

The loss never sees a label, but the batch is drawn with the world's structure in mind: scenes come
in families that differ in one attribute each (as for CLIP). Among random scenes the background
and the object's colour alone tell every scene apart, and SimCLR stops there (the classic shortcut);
a family's members are each other's hard negatives, so shape, size and position must be seen too.

Scenes are training combinations only; clutter objects are too (drawn like the groups' clutter).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from easyref.files import atomic_folder, write_json
from easyref.shapes.clip import (
    QUALITY_FILE,
    evaluation_scenes,
    family_batch,
    other_value,
    sincos_positions,
    to_pixels,
)
from easyref.shapes.groups import clutter
from easyref.shapes.world import (
    ATTRIBUTES,
    IMAGE_SIZE,
    Attributes,
    Scene,
    Shape,
    View,
    bounding_box,
    clean_scene,
    place,
    render,
)
from easyref.training.steps import LoopSettings, step_rng, train

NAME = "dino"
WIDTH = 64
LAYERS = 4
PATCH_SIZE = 8
INIT_RANGE = 0.06   # 3x DINOv2's: out of the fresh ViT's near-linear plateau sooner (as INIT_FACTOR in clip.py)
STEPS = 500
LEARNING_RATE = 2e-3
WARMUP = 20
WEIGHT_DECAY = 0.05
SCENES = 48             # per batch; each gives two views
FAMILY_SIZE = 4         # scenes per family (see clip.family_batch): each other's hard negatives
TEMPERATURE = 0.1
EVAL_SCENES = 200
_EVAL_STREAM = 11
_CLUTTER = (0, 1, 2)
_CLUTTER_PROBS = (0.4, 0.3, 0.3)


def build_dino(seed: int = 0) -> Dinov2Model:
    """A small DINOv2 whose position embeddings start from 2D sine-cosine codes (see :func:`sincos_positions`)."""
    config = Dinov2Config(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4, mlp_ratio=4,
                          image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, initializer_range=INIT_RANGE)
    torch.manual_seed(seed)
    model = Dinov2Model(config)
    with torch.no_grad():
        model.embeddings.position_embeddings[0, 1:] = sincos_positions(IMAGE_SIZE // PATCH_SIZE, WIDTH)
    return model


def image_processor() -> BitImageProcessorPil:
    """64x64 in, 64x64 out (a resize only for images of another size), ImageNet normalisation as DINOv2."""
    return BitImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)


def _view(rng: np.random.Generator, main: Shape) -> View:
    """Milder than a group reference's view: DINO-I must still see size and position after it."""
    occluder = None
    if rng.random() < 0.3:
        x0, y0, x1, y1 = bounding_box(main)
        w, h = (x1 - x0) * rng.uniform(0.2, 0.4), (y1 - y0) * rng.uniform(0.2, 0.4)
        ox, oy = rng.uniform(x0, x1 - w), rng.uniform(y0, y1 - h)
        occluder = (float(ox), float(oy), float(ox + w), float(oy + h))
    crop = None
    if rng.random() < 0.3:
        side = float(rng.uniform(54, 64))
        crop = (float(rng.uniform(0, 64 - side)), float(rng.uniform(0, 64 - side)), side)
    return View(gains=tuple(float(g) for g in rng.uniform(0.85, 1.15, 3)), offset=float(rng.uniform(-12, 12)),
                occluder=occluder, occluder_shade=float(rng.uniform(0.3, 0.7)), crop=crop,
                noise_sigma=float(rng.uniform(0, 5)), noise_seed=int(rng.integers(2**31)))


def augmented_view(attributes: Attributes, rng: np.random.Generator) -> np.ndarray:
    """One view of the scene ``attributes``: its own pose, clutter in other cells, lighting, crop, noise."""
    main = place(attributes, rng)
    identity = {name: getattr(attributes, name) for name in ("shape", "colour", "pattern")}
    others = clutter(rng, "train", identity, attributes, int(rng.choice(_CLUTTER, p=_CLUTTER_PROBS)))
    return render(Scene(objects=(main, *others), background=attributes.background, texture=attributes.texture,
                        view=_view(rng, main)))


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    return to_pixels(np.stack(images), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def info_nce(embeddings: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's loss for (2N, d) embeddings where rows i and i + N are two views of one scene."""
    z = F.normalize(embeddings, dim=-1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
    n = len(z) // 2
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def embed(model: Dinov2Model, images: list[np.ndarray]) -> torch.Tensor:
    """Unit-length ``pooler_output``: what DINO-I compares."""
    return F.normalize(model(pixel_values=_pixels(images)).pooler_output, dim=-1)


def _render_clean(attributes: Attributes, rng: np.random.Generator) -> np.ndarray:
    return render(clean_scene(attributes, rng))


@torch.no_grad()
def swap_accuracy(model: Dinov2Model, scenes: list[Attributes], rng: np.random.Generator,
                  augmented: bool) -> dict[str, float]:
    """Per attribute: how often a clean render is closer to another render of the same scene than to
    one with that attribute changed: DINO-I's job in small. Chance is 0.5.

    The other renders differ in pose only, or (``augmented``) are full training views (clutter,
    lighting, crop, noise, occluder). A network at its random initialisation already passes the
    pose-only test (pixels differ most where an attribute changes); the augmented one measures what
    training added: identity seen through the nuisances.
    """
    draw = augmented_view if augmented else _render_clean
    anchors = embed(model, [_render_clean(a, rng) for a in scenes])
    same = (anchors * embed(model, [draw(a, rng) for a in scenes])).sum(-1)
    accuracy = {}
    for name in ATTRIBUTES:
        changed = embed(model, [draw(other_value(a, name, rng), rng) for a in scenes])
        accuracy[name] = float((same > (anchors * changed).sum(-1)).float().mean())
    return accuracy


def evaluate(model: Dinov2Model, seed: int, count: int = EVAL_SCENES) -> dict:
    """The swap test, pose-only and augmented, on fresh training and held-out combinations."""
    model.eval()
    report: dict[str, dict] = {"pose": {}, "augmented": {}}
    for test, augmented in (("pose", False), ("augmented", True)):
        for split, held_out in (("train", False), ("held_out", True)):
            rng = np.random.default_rng([seed, _EVAL_STREAM, int(held_out), int(augmented)])
            accuracy = swap_accuracy(model, evaluation_scenes(seed, held_out, count), rng, augmented)
            report[test][split] = {"per_attribute": accuracy, "mean": float(np.mean(list(accuracy.values())))}
    return report


def pretrain_dino(output: str | Path, *, steps: int | None = None, seed: int = 0, progress: bool = True,
                  work_dir: str | Path | None = None, scenes: int = SCENES, eval_scenes: int = EVAL_SCENES) -> dict:
    """Train ShapesWorld's DINO and publish it as the DINOv2 folder ``output`` (with ``quality.json``).

    ``steps=None`` is the full budget (:data:`STEPS`). Checkpoints and the log go to ``work_dir``
    (default ``output/../work/dino``). Returns the training summary with the swap test of :func:`evaluate`.
    """
    output = Path(output)
    work_dir = Path(work_dir) if work_dir is not None else output.parent / "work" / NAME
    model = build_dino(seed)
    steps = steps or STEPS
    settings = LoopSettings(steps=steps, learning_rate=LEARNING_RATE, seed=seed, warmup_steps=min(WARMUP, steps // 4),
                            weight_decay=WEIGHT_DECAY, log_every=max(1, min(25, steps // 4)))

    def step_loss(step: int) -> torch.Tensor:
        rng = step_rng(seed, step)
        batch = family_batch(rng, scenes // FAMILY_SIZE, FAMILY_SIZE)
        views = [augmented_view(a, rng) for a in batch] + [augmented_view(a, rng) for a in batch]
        return info_nce(model(pixel_values=_pixels(views)).pooler_output)

    summary = train(NAME, model, step_loss, settings, work_dir, progress=progress)
    began = time.perf_counter()
    summary["swap_accuracy"] = evaluate(model, seed, eval_scenes)
    parameters = sum(p.numel() for p in model.parameters())
    summary.update(parameters=parameters, fp16_megabytes=parameters * 2 / 1e6, seed=seed, batch_size=2 * scenes,
                   evaluation_seconds=time.perf_counter() - began)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(output) as staging:
        model.save_pretrained(staging)
        image_processor().save_pretrained(staging)
        write_json(staging / QUALITY_FILE, summary)
    return summary
