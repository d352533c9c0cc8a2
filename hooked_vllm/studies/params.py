"""Each study's parameters, with its paper's setting as the defaults: what the command line needs
before anything heavy is imported (plain dataclasses; no torch).

A parameter is a dataclass field whose metadata says what it means (``help``) and how the command
line reads it (``type``, ``nargs``, ``choices``); ``hooked-vllm study NAME`` offers each as a flag
(``window`` -> ``--window``, a boolean as ``--only-correct/--no-only-correct``).

Example:
    >>> KnockoutParams().edges
    ('image->question', 'image->last', 'question->last')
    >>> KnockoutParams(window=3).window
    3
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def param(default: Any, help: str, **cli: Any) -> Any:
    """A study parameter: its default, what it means, and how the command line reads it."""
    return field(default=default, metadata={"help": help, **cli})


#: Zhang et al.'s edge types, as ``source->target``: the target's queries may not read the source's keys
KNOCKOUT_EDGES = ("image->question", "image->last", "question->last")
#: the token groups an edge may name (``question``: the instruction's words, the package's ``text``)
EDGE_GROUPS = ("image", "question", "special", "last")
#: the window of Zhang et al. (their k, on 32- and 40-layer LLaVA models)
PAPER_WINDOW = 9


@dataclass(frozen=True)
class KnockoutParams:
    """Attention knockout windows (Zhang, Yadav, Han, Shutova 2024, arXiv 2411.18620)."""

    window: int | None = param(
        None,
        f"layers each knockout window spans: Zhang et al.'s k = {PAPER_WINDOW}, clipped to a third of the "
        "model's blocks (at least 1) on shallower models so that the curve keeps several windows; a "
        "number given is used as it is",
        type=int,
    )
    edges: tuple[str, ...] = param(
        KNOCKOUT_EDGES,
        "the edge types to block, one at a time, as source->target (the target's queries may not read "
        f"the source's keys); groups: {', '.join(EDGE_GROUPS)}",
        nargs="+",
    )
    answer: str = param(
        "label",
        "whose answer's probability is followed: 'label' (the dataset's answer, its first token; items "
        "without one fall back to the prediction) or 'prediction' (the model's own top-1 token)",
        choices=("label", "prediction"),
    )
    only_correct: bool = param(
        True,
        "average over the items the model answers correctly (its top-1 token is the answer), as "
        "knockout studies do, so that the relative change is of a prediction the model makes",
        type=bool,
    )

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1 layer; got {self.window}.")
        for edge in self.edges:
            source, _, target = edge.partition("->")
            if source not in EDGE_GROUPS or target not in EDGE_GROUPS:
                raise ValueError(
                    f"edge {edge!r}: write source->target with groups among {', '.join(EDGE_GROUPS)} "
                    f"(e.g. {KNOCKOUT_EDGES[0]})."
                )
        if len(set(self.edges)) != len(self.edges) or not self.edges:
            raise ValueError(f"edges must name at least one edge type, each once; got {list(self.edges)}.")


#: every study: name -> (its parameters, the module that runs it, one line saying what it does)
STUDIES: dict[str, tuple[type, str, str]] = {
    "knockout": (
        KnockoutParams,
        "hooked_vllm.studies.knockout",
        "attention knockout windows (Zhang et al. 2024): the answer's probability with image->question, "
        "image->last or question->last blocked in a sliding window of layers",
    ),
}


def params_dict(params: Any) -> dict[str, Any]:
    """The parameters as JSON values (tuples as lists), as a run's settings store them."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(params).items()}


def param_fields(params_type: type) -> list:
    """The dataclass fields of a study's parameters, in order."""
    return list(fields(params_type))
