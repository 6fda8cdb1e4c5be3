"""Which attribute combinations training may ever see, and which only the held-out test shows.

Two families of triples are held out of *all* training data (every pretraining run and every
EasyRef stage, references and clutter included):

* object triples (shape, colour, pattern): 10 of 108, those with ``(shape + 2·colour + pattern) % 9 == 0``;
* style triples (background, texture, pattern): 8 of 54, those with ``(background + 2·texture + 4·pattern) % 9 == 4``.

The rules are fixed arithmetic, not a random draw, so anyone can check them by hand; each held-out
triple differs from training triples in one attribute only, and every *pair* of values still
appears in training (tests check both), so held-out groups test composition, not unseen words.
"""

from __future__ import annotations

import numpy as np

from easyref.shapes.world import ATTRIBUTES, Attributes, random_attributes

SPLITS = ("train", "held-in", "held-out")


def object_triple_held_out(shape: int, colour: int, pattern: int) -> bool:
    return (shape + 2 * colour + pattern) % 9 == 0


def style_triple_held_out(background: int, texture: int, pattern: int) -> bool:
    return (background + 2 * texture + 4 * pattern) % 9 == 4


def is_held_out(attributes: Attributes) -> bool:
    """Does this scene's main object or style use a combination no training data may contain?"""
    return (object_triple_held_out(attributes.shape, attributes.colour, attributes.pattern)
            or style_triple_held_out(attributes.background, attributes.texture, attributes.pattern))


def object_allowed(shape: int, colour: int, pattern: int) -> bool:
    """May an object (main or clutter) with these values appear in training data?"""
    return not object_triple_held_out(shape, colour, pattern)


def random_train_attributes(rng: np.random.Generator, **fixed: int) -> Attributes:
    """Attributes uniformly over the training combinations, with ``fixed`` values kept (rejection sampling)."""
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}")
    for _ in range(1000):
        attributes = random_attributes(rng).replace(**fixed)
        if not is_held_out(attributes):
            return attributes
    raise ValueError(f"no training combination has {fixed}")


def random_held_out_attributes(rng: np.random.Generator) -> Attributes:
    """Attributes uniformly over the held-out combinations (rejection sampling): for evaluations only."""
    while True:
        attributes = random_attributes(rng)
        if is_held_out(attributes):
            return attributes
