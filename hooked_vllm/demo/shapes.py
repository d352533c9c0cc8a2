"""A synthetic visual task: one or two coloured shapes on a plain background, with a caption and
question/answer pairs. Deterministic given a seed.

Questions (single-word answers):
- ``what colour is the {shape} ?`` -> colour      (asked when that shape appears once)
- ``what shape is {colour} ?``     -> shape       (asked when that colour appears once)
- ``how many shapes are there ?``  -> one/two
- ``is the {a} left of the {b} ?`` -> yes/no      (a, b distinct shapes, each appearing once)
- ``describe the image .``         -> a caption, e.g. ``a red circle and a blue square``
- ``name the colours .``           -> ``circle red and square blue``

Captions list the shapes in an order drawn at random (see :func:`caption`).

Example:
    >>> scene = random_scene(np.random.default_rng(0))
    >>> image = render(scene)
    >>> image.size
    (64, 64)
    >>> sorted(qa.kind for qa in questions(scene))[:1]
    ['colour']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three")
IMAGE_SIZE = 64
GRID = 4  # the demo model's 4 x 4 grid of 16-px patches
CELL = IMAGE_SIZE // GRID
BACKGROUND = (235, 235, 235)
#: Seeds of :func:`examples` from here up to 10**9 are never used in training (the trainer's
#: language stage uses ``train.data_seed(seed, step)``, its vision stage 10**9 and above).
HELD_OUT_SEED_BASE = 10**8


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: int  # centre
    y: int
    size: int  # half-width


@dataclass(frozen=True)
class QA:
    kind: str  # colour | shape | count | relation
    question: str
    answer: str


def random_scene(rng: np.random.Generator, max_shapes: int = 2) -> list[Shape]:
    """One to ``max_shapes`` shapes, each inside its own cell of the GRID x GRID patch grid.

    Each shape (10-14 px) lies within one 16-px cell, jittered inside it, so a vision patch sees a
    whole shape: shape and colour are patch-local, and the image token holding an object is known
    (ground truth for saliency and patching studies).
    """
    n = int(rng.integers(1, max_shapes + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    shapes: list[Shape] = []
    for cell in cells:
        size = int(rng.integers(5, 8))
        slack = CELL // 2 - size - 1
        row, col = divmod(int(cell), GRID)
        x = col * CELL + CELL // 2 + int(rng.integers(-slack, slack + 1))
        y = row * CELL + CELL // 2 + int(rng.integers(-slack, slack + 1))
        shapes.append(Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), x, y, size))
    return shapes


def patch_of(shape: Shape) -> int:
    """Index (row-major) of the grid cell, i.e. the image token, that holds ``shape``."""
    return (shape.y // CELL) * GRID + shape.x // CELL


def patch_labels(scene: list[Shape]) -> tuple[list[int], list[int]]:
    """Ground truth of every image token (row-major grid cell): its colour and its shape, each
    ``1 + index`` into ``COLOURS`` / ``SHAPES`` where the cell holds a shape, 0 for background."""
    colours, kinds = [0] * (GRID * GRID), [0] * (GRID * GRID)
    for s in scene:
        colours[patch_of(s)] = 1 + list(COLOURS).index(s.colour)
        kinds[patch_of(s)] = 1 + SHAPES.index(s.kind)
    return colours, kinds


def render(scene: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in scene:
        box = (s.x - s.size, s.y - s.size, s.x + s.size, s.y + s.size)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(
                [(s.x, s.y - s.size), (s.x - s.size, s.y + s.size), (s.x + s.size, s.y + s.size)], fill=fill
            )
    return image


def _listing_order(scene: list[Shape], rng: np.random.Generator | None) -> list[Shape]:
    """Reading order (the image tokens' order), or a random order when ``rng`` is given. Training
    uses random orders: in reading order the n-th object named is the n-th object token, so a model
    can caption by position and never learn which colour belongs to which shape."""
    ordered = sorted(scene, key=patch_of)
    if rng is None:
        return ordered
    return [ordered[i] for i in rng.permutation(len(ordered))]


def caption(scene: list[Shape], rng: np.random.Generator | None = None) -> str:
    """``a red circle and a blue square``: each shape named after its colour (colour -> shape binding)."""
    return " and ".join(f"a {s.colour} {s.kind}" for s in _listing_order(scene, rng))


def colour_caption(scene: list[Shape], rng: np.random.Generator | None = None) -> str:
    """``circle red and square blue``: each colour right after its shape's name, so predicting it is a
    one-step lookup from the shape word to that shape's image token (shape -> colour binding, what
    colour questions need)."""
    return " and ".join(f"{s.kind} {s.colour}" for s in _listing_order(scene, rng))


def questions(scene: list[Shape], rng: np.random.Generator | None = None) -> list[QA]:
    """Every question the scene answers unambiguously (captions list the shapes in reading order,
    or in an order drawn from ``rng``)."""
    out: list[QA] = []
    kinds = [s.kind for s in scene]
    colours = [s.colour for s in scene]
    for s in scene:
        if kinds.count(s.kind) == 1:
            out.append(QA("colour", f"what colour is the {s.kind} ?", s.colour))
        if colours.count(s.colour) == 1:
            out.append(QA("shape", f"what shape is {s.colour} ?", s.kind))
    out.append(QA("count", "how many shapes are there ?", NUMBERS[len(scene)]))
    out.append(QA("caption", "describe the image .", caption(scene, rng)))
    out.append(QA("caption", "name the colours .", colour_caption(scene, rng)))
    unique = [s for s in scene if kinds.count(s.kind) == 1]
    for a in unique:
        for b in unique:
            if a is not b and a.x != b.x:
                out.append(
                    QA("relation", f"is the {a.kind} left of the {b.kind} ?", "yes" if a.x < b.x else "no")
                )
    return out


def vocabulary() -> list[str]:
    """Every word the task and the LLaVA template use."""
    words = {"USER", "ASSISTANT", ":", "?", "a", "and", "what", "colour", "is", "the", "shape", "how", "many"}
    words |= {"shapes", "are", "there", "left", "of", "yes", "no", "describe", "image", "."}
    words |= {"name", "colours"}
    words |= set(COLOURS) | set(SHAPES) | set(NUMBERS)
    return sorted(words)


@dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str
    kind: str
    scene: tuple[Shape, ...]


QUESTION_KINDS = ("colour", "shape", "count", "relation")


def examples(seed: int, n: int, kinds: tuple[str, ...] = QUESTION_KINDS) -> list[Example]:
    """``n`` question/answer examples, one question drawn per scene, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out: list[Example] = []
    while len(out) < n:
        scene = random_scene(rng)
        pool = [qa for qa in questions(scene, rng) if qa.kind in kinds]
        if not pool:
            continue
        qa = pool[int(rng.integers(len(pool)))]
        out.append(Example(render(scene), qa.question, qa.answer, qa.kind, tuple(scene)))
    return out
