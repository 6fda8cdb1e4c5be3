"""ShapesWorld's groups: the MRBench analogue (references that share a concept, a target, a caption).

A group is built like the paper's data (METHOD.md §5): several references that share something,
one target that shares it too, and a caption that names only what the target adds. The concept
kinds play the paper's domains:

* ``identity``: the object is kept (shape, colour, pattern); size, position, pose and background
  vary. The caption names size, position and background.
* ``style``: the look is kept (background colour and texture, and the objects' pattern); the
  objects vary. The caption names the object's shape, colour, size and position.
* ``scene`` (held-out only, never in any training data): object AND background kept; the caption
  names only size and position. A concept-kind variant, testing zero-shot generalisation.

No single reference determines the concept: every reference is a spoiled view (lighting, an
occluding block, a crop, sensor noise) and most carry clutter objects, so only what several
references share reveals the concept, as in the paper's Fig. 9. The paper's Fig. 2 hard cases
are flagged groups: ``misaligned`` (the subject at opposite corners, sizes and strong rotations)
and ``distractor`` (one reference shows a different concept).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from easyref.shapes.splits import (
    SPLITS,
    is_held_out,
    object_allowed,
    object_triple_held_out,
    style_triple_held_out,
)
from easyref.shapes.world import (
    ATTRIBUTES,
    COLOURS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    Scene,
    Shape,
    View,
    bounding_box,
    clean_scene,
    place,
)

KINDS = ("identity", "style", "scene")
KINDS_BY_SPLIT = {"train": ("identity", "style"), "held-in": ("identity", "style"),
                  "held-out": ("identity", "style", "scene")}
CONCEPT_ATTRIBUTES = {
    "identity": ("shape", "colour", "pattern"),
    "style": ("background", "texture", "pattern"),
    "scene": ("shape", "colour", "pattern", "background", "texture"),
}
PROMPT_ATTRIBUTES = {kind: tuple(a for a in ATTRIBUTES if a not in concept)
                     for kind, concept in CONCEPT_ATTRIBUTES.items()}
HARD_CASES = ("misaligned", "distractor")
HARD_RATE = 0.1  # each hard case, in every split
QUESTION = "What do these images have in common?"
DESCRIBE = "Describe the image."

_CORNERS = (0, 2, 6, 8)
_CLUTTER_COUNTS = (0, 1, 2)
_CLUTTER_PROBS = (0.2, 0.4, 0.4)


@dataclasses.dataclass(frozen=True)
class Group:
    """One group: spoiled reference scenes, a clean target scene, its caption and its labels."""

    id: str
    split: str
    kind: str
    concept: dict[str, int]
    target: Attributes
    references: tuple[Scene, ...]
    target_scene: Scene
    caption: str
    hard: str | None = None

    @property
    def prompt(self) -> dict[str, int]:
        """The attributes the caption names (what prompt accuracy checks)."""
        return {name: getattr(self.target, name) for name in PROMPT_ATTRIBUTES[self.kind]}

    def labels(self) -> dict:
        """JSON-ready labels: what the judge checks for this group."""
        return {"id": self.id, "split": self.split, "kind": self.kind, "hard": self.hard,
                "concept": dict(self.concept), "prompt": self.prompt, "target": self.target.names(),
                "answer": concept_text(self.kind, self.concept)}


def group_caption(kind: str, target: Attributes) -> str:
    """What the target adds to the concept, in words (the EasyRef prompt)."""
    n = target.names()
    if kind == "identity":
        return f"a {n['size']} object at the {n['position']} on a {n['background']} {n['texture']} background"
    if kind == "style":
        return f"a {n['size']} {n['colour']} {n['shape']} at the {n['position']}"
    if kind == "scene":
        return f"a {n['size']} object at the {n['position']}"
    raise ValueError(f"unknown kind {kind!r}")


def concept_text(kind: str, concept: dict[str, int]) -> str:
    """The concept in words: the answer to :data:`QUESTION` that the MLLM learns for training kinds."""
    n = {name: ATTRIBUTES[name][value] for name, value in concept.items()}
    if kind == "identity":
        return f"the same {n['colour']} {n['pattern']} {n['shape']}"
    if kind == "style":
        return f"{n['pattern']} objects on a {n['background']} {n['texture']} background"
    if kind == "scene":
        return f"the same {n['colour']} {n['pattern']} {n['shape']} on a {n['background']} {n['texture']} background"
    raise ValueError(f"unknown kind {kind!r}")


def _choice(rng: np.random.Generator, n: int) -> int:
    return int(rng.integers(n))


def _concept(kind: str, split: str, rng: np.random.Generator) -> dict[str, int]:
    """Concept values: training combinations for train/held-in, held-out ones for held-out identity/style."""
    sizes = {name: len(ATTRIBUTES[name]) for name in CONCEPT_ATTRIBUTES[kind]}
    while True:
        concept = {name: _choice(rng, n) for name, n in sizes.items()}
        obj = "shape" in concept and object_triple_held_out(concept["shape"], concept["colour"], concept["pattern"])
        style = "background" in concept and style_triple_held_out(
            concept["background"], concept["texture"], concept["pattern"])
        if split == "held-out" and kind == "identity":
            ok = obj
        elif split == "held-out" and kind == "style":
            ok = style
        else:
            ok = not obj and not style
        if ok:
            return concept


def _attributes(rng: np.random.Generator, split: str, fixed: dict[str, int]) -> Attributes:
    """Random attributes around ``fixed``; outside held-out, never a held-out combination."""
    while True:
        values = {name: _choice(rng, len(vals)) for name, vals in ATTRIBUTES.items()}
        attributes = Attributes(**{**values, **fixed})
        if split == "held-out" or not is_held_out(attributes):
            return attributes


def clutter(rng: np.random.Generator, split: str, concept: dict[str, int], background: Attributes,
             count: int) -> list[Shape]:
    """Other objects in cells left free by ``background``'s main object; never the concept's object and,
    outside held-out, never a held-out object or a held-out pattern-on-background combination."""
    shapes = []
    free = [cell for cell in range(len(POSITIONS)) if cell != background.position]
    for cell in rng.permutation(free)[:count]:
        while True:
            triple = (_choice(rng, len(SHAPES)), _choice(rng, len(COLOURS)), _choice(rng, len(PATTERNS)))
            same = all(concept.get(k) == v for k, v in zip(("shape", "colour", "pattern"), triple, strict=True))
            seen_style = not style_triple_held_out(background.background, background.texture, triple[2])
            if not same and (split == "held-out" or (object_allowed(*triple) and seen_style)):
                break
        attrs = Attributes(*triple, size=_choice(rng, len(SIZES)), position=int(cell), background=0, texture=0)
        shapes.append(place(attrs, rng))
    return shapes


def _view(rng: np.random.Generator, main: Shape) -> View:
    occluder = None
    if rng.random() < 0.5:
        x0, y0, x1, y1 = bounding_box(main)
        w, h = (x1 - x0) * rng.uniform(0.3, 0.6), (y1 - y0) * rng.uniform(0.3, 0.6)
        ox, oy = rng.uniform(x0, x1 - w), rng.uniform(y0, y1 - h)
        occluder = (float(ox), float(oy), float(ox + w), float(oy + h))
    crop = None
    if rng.random() < 0.4:
        side = float(rng.uniform(40, 60))
        # Keep the main object's centre in view: a partial view, not a missing subject.
        x0 = float(np.clip(rng.uniform(main.cx - side + 6, main.cx - 6), 0, 64 - side))
        y0 = float(np.clip(rng.uniform(main.cy - side + 6, main.cy - 6), 0, 64 - side))
        crop = (x0, y0, side)
    return View(gains=tuple(float(g) for g in rng.uniform(0.8, 1.2, 3)), offset=float(rng.uniform(-20, 20)),
                occluder=occluder, occluder_shade=float(rng.uniform(0.3, 0.7)), crop=crop,
                noise_sigma=float(rng.uniform(2, 8)), noise_seed=int(rng.integers(2**31)))


def _reference(rng: np.random.Generator, split: str, kind: str, concept: dict[str, int],
               position: int | None = None, size: int | None = None, max_angle: float = 20.0) -> Scene:
    """One spoiled view that contains the concept."""
    fixed = dict(concept)
    if position is not None:
        fixed["position"] = position
    if size is not None:
        fixed["size"] = size
    attributes = _attributes(rng, split, fixed)
    main = place(attributes, rng, max_angle=max_angle)
    count = int(rng.choice(_CLUTTER_COUNTS, p=_CLUTTER_PROBS))
    # In style groups clutter is unrestricted: its random patterns are what leave one view ambiguous.
    others = clutter(rng, split, concept if kind != "style" else {}, attributes, count)
    objects = (main, *others) if rng.random() < 0.5 else (*others, main)
    return Scene(objects=objects, background=attributes.background, texture=attributes.texture,
                 view=_view(rng, main))


def _distractor(rng: np.random.Generator, split: str, kind: str, concept: dict[str, int]) -> Scene:
    """A reference of another concept of the same kind (paper Fig. 2's wrong reference)."""
    while True:
        other = _concept(kind, split, rng)
        if other != concept:
            return _reference(rng, split, kind, other)


def _stream(split: str, kind: str) -> int:
    return zlib.crc32(f"{split}/{kind}".encode())


def make_group(split: str, kind: str, index: int, num_references: int, seed: int = 0,
               hard: str | None = None) -> Group:
    """Group ``index`` of ``split``/``kind``: a pure function of its arguments (the world's seed included)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if kind not in KINDS_BY_SPLIT[split]:
        raise ValueError(f"kind {kind!r} does not occur in split {split!r}")
    if hard not in (None, *HARD_CASES):
        raise ValueError(f"hard must be one of {HARD_CASES} or None, got {hard!r}")
    if num_references < 1:
        raise ValueError("a group needs at least one reference")
    rng = np.random.default_rng([seed, _stream(split, kind), index])
    concept = _concept(kind, split, rng)
    target = _attributes(rng, split, concept)
    references = []
    for i in range(num_references):
        if hard == "misaligned" and kind != "style":
            references.append(_reference(rng, split, kind, concept, position=_CORNERS[i % 4], size=i % 2,
                                         max_angle=45.0))
        else:
            references.append(_reference(rng, split, kind, concept))
    if hard == "distractor" and num_references > 1:
        references[int(rng.integers(num_references))] = _distractor(rng, split, kind, concept)
    return Group(id=f"{split}-{kind}-{index:05d}", split=split, kind=kind, concept=concept, target=target,
                 references=tuple(references), target_scene=clean_scene(target, rng),
                 caption=group_caption(kind, target), hard=hard)


def hard_case(split: str, kind: str, index: int, seed: int = 0) -> str | None:
    """Which groups are hard cases: a fixed ``HARD_RATE`` of each kind, drawn per group."""
    u = np.random.default_rng([seed, _stream(split, kind), index, 1]).random()
    if u < HARD_RATE and kind != "style":
        return "misaligned"
    if u > 1 - HARD_RATE:
        return "distractor"
    return None


def sample_group(split: str, index: int, num_references: int, seed: int = 0) -> Group:
    """The ``index``-th group of a split: kinds in turn, hard cases at their fixed rate."""
    kinds = KINDS_BY_SPLIT[split]
    kind = kinds[index % len(kinds)]
    return make_group(split, kind, index, num_references, seed, hard_case(split, kind, index, seed))

