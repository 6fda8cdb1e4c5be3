"""Example groups for the bundled ShapesWorld model, addressable by name.

They are benchmark groups, rendered on demand from the world's fixed seed (the renderer is
deterministic, so nothing is stored): the first group of each kind that is not a hard case, in
the held-in split (concepts built from training combinations) and in the held-out split (never
seen in training). They were fixed by that rule, not picked by how well a model does on them.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from easyref.errors import InvalidArgumentError
from easyref.files import atomic_write
from easyref.shapes.groups import KINDS_BY_SPLIT, Group, concept_text, sample_group
from easyref.shapes.world import render

EXAMPLE_REFERENCES = 4
SEARCHED = 64  # groups looked at per split for the first non-hard one of each kind


# ``<split>-<kind>`` for every kind of the two test splits, e.g. ``held-in-identity``.
_EXAMPLES = {f"{split}-{kind}": (split, kind) for split in ("held-in", "held-out") for kind in KINDS_BY_SPLIT[split]}


def example_names() -> list[str]:
    return list(_EXAMPLES)


def example_group(name: str, references: int = EXAMPLE_REFERENCES, seed: int = 0) -> Group:
    """The example group called ``name`` (one of :func:`example_names`)."""
    if name not in _EXAMPLES:
        raise InvalidArgumentError(f"unknown example {name!r}; one of: {', '.join(_EXAMPLES)}")
    split, kind = _EXAMPLES[name]
    for index in range(SEARCHED):
        group = sample_group(split, index, references, seed)
        if group.kind == kind and group.hard is None:
            return group
    raise AssertionError(f"no plain {kind} group among the first {SEARCHED} of {split}")


def example_images(group: Group) -> list[Image.Image]:
    """The group's references as images."""
    return [Image.fromarray(render(scene)) for scene in group.references]


def write_example(name: str, folder: Path) -> Path:
    """``folder/name/``: ref-00.png ..., target.png, caption.txt (the prompt) and concept.txt (what they share)."""
    group = example_group(name)
    out = Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(example_images(group)):
        atomic_write(out / f"ref-{index:02d}.png", lambda tmp, image=image: image.save(tmp, format="PNG"))
    atomic_write(out / "target.png",
                 lambda tmp: Image.fromarray(render(group.target_scene)).save(tmp, format="PNG"))
    atomic_write(out / "caption.txt", lambda tmp: tmp.write_text(group.caption + "\n"))
    atomic_write(out / "concept.txt", lambda tmp: tmp.write_text(concept_text(group.kind, group.concept) + "\n"))
    return out
