"""A synthetic English corpus about scenes of coloured shapes, for pretraining the language model of
the second demo model (``train_phases.py``) before it ever sees an image.

Each document describes one scene (``shapes.random_scene``) in text, in sentences drawn from about
thirty templates (existential, possessive, relational, positional, counting, attributive, and
questions with their answers in three formats, one of them LLaVA's chat template with the
description where the image will be), in a random order, with a few general facts about shapes and
colours mixed in. The same scene is told many ways, so predicting the next word needs the grammar,
not a lookup table.

Example:
    >>> docs = documents(seed=0, n=2)
    >>> len(docs), all(w in vocabulary() for d in docs for w in d.split())
    (2, True)
"""

from __future__ import annotations

import numpy as np

from hooked_vllm.demo import shapes

FACTS = (
    "a circle is round .",
    "a circle has no corners .",
    "a square has four corners .",
    "a square has four sides of the same length .",
    "a triangle has three corners .",
    "a triangle has three sides .",
    "red , green , blue , yellow and purple are colours .",
    "circle , square and triangle are shapes .",
    "the sky is blue and the grass is green .",
    "a lemon is yellow and a tomato is red .",
    "one and one make two .",
    "two is more than one .",
    "every shape has a colour .",
    "an image can show one shape or two shapes .",
)
SEED_BASE = 3 * 10**7  # the corpus's data seeds (the trainer adds the step), below shapes' held-out range


def _vertical(s: shapes.Shape) -> str:
    return "top" if s.y < shapes.IMAGE_SIZE // 2 else "bottom"


def _horizontal(s: shapes.Shape) -> str:
    return "left" if s.x < shapes.IMAGE_SIZE // 2 else "right"


def _noun_phrase(s: shapes.Shape, rng: np.random.Generator, definite: bool = False) -> str:
    forms = [f"a {s.colour} {s.kind}", f"one {s.colour} {s.kind}", f"a {s.kind} that is {s.colour}"]
    if definite:
        forms = [f"the {s.colour} {s.kind}"]
    return forms[int(rng.integers(len(forms)))]


def describe(scene: list[shapes.Shape], rng: np.random.Generator) -> str:
    """One sentence naming every shape of the scene, in one of several forms."""
    order = [scene[i] for i in rng.permutation(len(scene))]
    listed = " and ".join(_noun_phrase(s, rng) for s in order)
    count = shapes.NUMBERS[len(scene)]
    forms = [
        f"there is {listed} .",
        f"i see {listed} .",
        f"we can see {listed} .",
        f"the image shows {listed} .",
        f"this picture has {listed} .",
        f"in the image there {'is' if len(scene) == 1 else 'are'} {count} "
        f"{'shape' if len(scene) == 1 else 'shapes'} : {listed} .",
        f"{listed} {'is' if len(scene) == 1 else 'are'} in the image .",
    ]
    return forms[int(rng.integers(len(forms)))]


def facts_of(scene: list[shapes.Shape], rng: np.random.Generator) -> list[str]:
    """Sentences each stating one thing about the scene: attributes, places, relations, the count."""
    out = []
    kinds = [s.kind for s in scene]
    colours = [s.colour for s in scene]
    for s in scene:
        if kinds.count(s.kind) == 1:
            out += [f"the {s.kind} is {s.colour} .", f"the colour of the {s.kind} is {s.colour} ."]
        if colours.count(s.colour) == 1:
            out += [f"the {s.colour} shape is a {s.kind} .", f"the shape that is {s.colour} is a {s.kind} ."]
        out.append(f"{_noun_phrase(s, rng, definite=True)} is at the {_vertical(s)} {_horizontal(s)} .")
        out.append(f"{_noun_phrase(s, rng, definite=True)} is on the {_horizontal(s)} side .")
    n = len(scene)
    out.append(f"there {'is' if n == 1 else 'are'} {shapes.NUMBERS[n]} {'shape' if n == 1 else 'shapes'} .")
    if n == 2:
        a, b = sorted(scene, key=lambda s: s.x)
        if a.x != b.x and a.kind != b.kind:
            out += [f"the {a.kind} is left of the {b.kind} .", f"the {b.kind} is right of the {a.kind} ."]
        top, bottom = sorted(scene, key=lambda s: s.y)
        if top.y != bottom.y and top.kind != bottom.kind:
            out.append(f"the {top.kind} is above the {bottom.kind} .")
    return out


def question_answers(scene: list[shapes.Shape], rng: np.random.Generator) -> list[str]:
    """The scene's questions (``shapes.questions``) with their answers, in three formats."""
    out = []
    for qa in shapes.questions(scene, rng):
        form = int(rng.integers(3))
        if form == 0:
            out.append(f"question : {qa.question} answer : {qa.answer} .")
        elif form == 1:
            out.append(f"q : {qa.question} a : {qa.answer} .")
        else:
            out.append(f"{qa.question} {qa.answer} .")
    return out


def chat(scene: list[shapes.Shape], rng: np.random.Generator) -> str:
    """LLaVA's template with a description where the image goes: what the image will stand for."""
    qa = [qa for qa in shapes.questions(scene, rng)]
    pick = qa[int(rng.integers(len(qa)))]
    return f"USER: {describe(scene, rng)} {pick.question} ASSISTANT: {pick.answer}"


def document(rng: np.random.Generator) -> str:
    """A description of one random scene: a few sentences in random order, or a chat turn."""
    scene = shapes.random_scene(rng)
    if rng.random() < 0.3:
        return chat(scene, rng)
    pool = facts_of(scene, rng) + question_answers(scene, rng)
    k = int(rng.integers(2, 5))
    sentences = [describe(scene, rng)] + [
        pool[i] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)
    ]
    if rng.random() < 0.5:
        sentences = [sentences[i] for i in rng.permutation(len(sentences))]
    if rng.random() < 0.3:
        sentences.insert(int(rng.integers(len(sentences) + 1)), FACTS[int(rng.integers(len(FACTS)))])
    return " ".join(sentences)


def documents(seed: int, n: int) -> list[str]:
    """``n`` documents, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return [document(rng) for _ in range(n)]


def vocabulary() -> list[str]:
    """Every word of the corpus, the shapes task and LLaVA's template."""
    words = set(shapes.vocabulary())
    extra = """there i see we can this picture has in are shows image shape one that at top bottom side
    on right above question answer q , round no corners four three sides same length green lemon tomato
    sky grass more than every or make""".split()
    words |= set(extra)
    for text in FACTS:
        words |= set(text.split())
    return sorted(words)
