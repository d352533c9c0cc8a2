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


#: FastV's filtering layer K and ratio R (Chen et al. 2024: K = 2, R = 50%), and the grid around them
FASTV_LAYER, FASTV_RATIO = 2, 0.5
PRUNING_LAYERS = (1, 2, 3)
PRUNING_RATIOS = (0.25, 0.5, 0.75, 0.9)
#: a position-free selection to compare FastV's with (FEATHER's position-bias diagnostic)
PRUNING_BASELINES = ("random", "stride", "none")


@dataclass(frozen=True)
class PruningParams:
    """Visual-token pruning after layer K (FastV, Chen et al. 2024, arXiv 2403.06764), with
    FEATHER's position-bias diagnostic (Endo et al. 2024, arXiv 2412.13180)."""

    layers: tuple[int, ...] = param(
        PRUNING_LAYERS,
        f"the filtering layers K: from block K on, only the kept image tokens are readable; the "
        f"selection reads block K-1's attention (FastV: K = {FASTV_LAYER}); each at least 1",
        nargs="+",
        type=int,
    )
    ratios: tuple[float, ...] = param(
        PRUNING_RATIOS,
        f"the pruned fractions R of the image tokens (FastV: R = {FASTV_RATIO}); the kept count is "
        "round(n_image * (1 - R)) as FastV's code rounds it",
        nargs="+",
        type=float,
    )
    received_from: str = param(
        "last",
        "whose attention ranks the image tokens: 'last' (the last position's, averaged over heads, as "
        "FastV's released code) or 'all' (the mean over every real query position, as the paper's "
        "text writes it)",
        choices=("last", "all"),
    )
    baseline: str = param(
        "random",
        "the position-free selection run beside FastV's at every K and R (the same kept count): "
        "'random' (seeded per item), 'stride' (every (1/(1-R))-th image token, uniform over the grid) "
        "or 'none'",
        choices=PRUNING_BASELINES,
    )
    random_seed: int = param(
        0, "seed of the random baseline (each item's draw also depends on its id)", type=int, minimum=0
    )
    answer: str = param(
        "label",
        "whose answer is scored: 'label' (the dataset's answer, its first token; items without one "
        "fall back to the prediction) or 'prediction' (the unpruned model's own top-1 token)",
        choices=("label", "prediction"),
    )
    row_bins: int | None = param(
        None,
        "rows of the position-bias histogram: default the image grid's rows (every item must have the "
        "same); a number bins each kept token's relative height on its grid into that many rows",
        type=int,
    )

    def __post_init__(self) -> None:
        if not self.layers or any(k < 1 for k in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(
                f"layers must be distinct blocks of at least 1 (the selection reads block K-1); got "
                f"{list(self.layers)}."
            )
        if (
            not self.ratios
            or any(not 0 < r < 1 for r in self.ratios)
            or len(set(self.ratios)) != len(self.ratios)
        ):
            raise ValueError(
                f"ratios must be distinct fractions between 0 and 1 (0.5 = half); got {list(self.ratios)}."
            )
        if self.row_bins is not None and self.row_bins < 1:
            raise ValueError(f"row_bins must be at least 1; got {self.row_bins}.")


#: Neo et al.'s ablation: the mean of the visual tokens, and the object's patches plus a buffer of 0
OBJECT_ABLATIONS = ("mean", "zero")


@dataclass(frozen=True)
class ObjectAblationParams:
    """Object-token ablation and the logit lens at the object's tokens (Neo, Ong, Torr, Geva,
    Krueger, Barez 2024, arXiv 2410.07149)."""

    ablation: str = param(
        "mean",
        "what replaces an ablated image token's embedding (the language model's input): 'mean' (the "
        "mean of every image token of the run's items, as Neo et al. use one mean vector) or 'zero'",
        choices=OBJECT_ABLATIONS,
    )
    buffer: int = param(
        0,
        "grid cells added around the object's tokens on every side (Neo et al.: 0, 1 or 2)",
        type=int,
        minimum=0,
    )
    objects: str = param(
        "asked",
        "which objects' tokens are ablated: 'asked' (those the question names, the dataset's "
        "meta['asked']) or 'all' (every object of the image)",
        choices=("asked", "all"),
    )
    random_excludes_objects: bool = param(
        False,
        "draw the random control's tokens from the image tokens outside every object (Neo et al. draw "
        "from all image tokens)",
        type=bool,
    )
    random_seed: int = param(
        0, "seed of the random control (each item's draw also depends on its id)", type=int, minimum=0
    )
    top_k: int = param(
        5,
        "the logit lens counts the object's name as verbalized where it is among the top-k tokens",
        type=int,
    )
    lens_words: tuple[str, ...] = param(
        ("name",),
        "the object fields whose word the logit lens looks for (the shapes dataset's objects have "
        "'name' and 'colour')",
        nargs="+",
    )
    answer: str = param(
        "label",
        "whose answer is scored: 'label' (the dataset's answer) or 'prediction' (the clean model's top-1)",
        choices=("label", "prediction"),
    )

    def __post_init__(self) -> None:
        if self.buffer < 0:
            raise ValueError(f"buffer must be 0 or more grid cells; got {self.buffer}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1; got {self.top_k}.")
        if not self.lens_words or len(set(self.lens_words)) != len(self.lens_words):
            raise ValueError(
                f"lens_words must name at least one object field, each once; got {list(self.lens_words)}."
            )


#: the hook kinds attribution patching estimates (``z``: per head)
ATTRIBUTION_KINDS = ("resid_pre", "attn_out", "mlp_out", "z")
#: the position groups of the layer x group maps (disjoint: ``last`` is taken out of the others)
ATTRIBUTION_GROUPS = ("image", "text", "special", "last")


@dataclass(frozen=True)
class AttributionParams:
    """Attribution patching beside real activation patching (Nanda 2023; Syed, Rager, Conmy 2023,
    arXiv 2310.10348; Kramar, Lieberum, Shah, Nanda 2024, arXiv 2403.00745)."""

    kinds: tuple[str, ...] = param(
        ("resid_pre",),
        "the hook kinds estimated, all from the same forward and backward: resid_pre, attn_out, "
        "mlp_out, z (per head)",
        nargs="+",
        choices=ATTRIBUTION_KINDS,
    )
    pairs: str = param(
        "swap",
        "the corrupted counterpart of each item: 'swap' (the same question on another image of the "
        "dataset whose answer differs, resized to the item's size) or 'noise' (the item's own image "
        "under Gaussian pixel noise)",
        choices=("swap", "noise"),
    )
    noise: int = param(
        96, "the pixel noise's standard deviation, of 255 (--pairs noise only)", type=int, minimum=1
    )
    cells: int = param(
        32,
        "single (block, position[, head]) cells patched for real per item and hook kind, drawn evenly "
        "from the position groups (one forward each per batch)",
        type=int,
    )
    groups: tuple[str, ...] = param(
        ATTRIBUTION_GROUPS,
        "the position groups of the block x group maps and of the drawn cells",
        nargs="+",
        choices=ATTRIBUTION_GROUPS,
    )
    answer: str = param(
        "label",
        "the answers compared: 'label' (the dataset's answers of the item and of its partner, their "
        "first tokens) or 'prediction' (the model's own top-1 tokens on the clean and corrupted runs)",
        choices=("label", "prediction"),
    )
    only_correct: bool = param(
        True,
        "count the pairs whose clean and corrupted items the model answers (top-1 = each one's answer), "
        "as patching studies do",
        type=bool,
    )

    def __post_init__(self) -> None:
        for name, values in (("kinds", self.kinds), ("groups", self.groups)):
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must name at least one, each once; got {list(values)}.")
        if self.cells < 1 or self.noise < 1:
            raise ValueError(f"cells and noise must be at least 1; got {self.cells} and {self.noise}.")


#: every study: name -> (its parameters, the module that runs it, one line saying what it does)
STUDIES: dict[str, tuple[type, str, str]] = {
    "knockout": (
        KnockoutParams,
        "hooked_vllm.studies.knockout",
        "attention knockout windows (Zhang et al. 2024): the answer's probability with image->question, "
        "image->last or question->last blocked in a sliding window of layers",
    ),
    "pruning": (
        PruningParams,
        "hooked_vllm.studies.pruning",
        "visual-token pruning after layer K (FastV, Chen et al. 2024): accuracy and counted FLOPs over a "
        "grid of K and R, and where on the image grid the kept tokens lie (FEATHER's diagnostic)",
    ),
    "object-ablation": (
        ObjectAblationParams,
        "hooked_vllm.studies.object_ablation",
        "object-token ablation (Neo et al. 2024): correct answers with the object's image tokens "
        "ablated vs as many random ones, and the logit lens's verbalization of the object by layer",
    ),
    "attribution": (
        AttributionParams,
        "hooked_vllm.studies.attribution_study",
        "attribution patching (Nanda 2023; Syed et al. 2023; Kramar et al. 2024): the gradient estimate "
        "at every block's hook and position beside real activation patching, and their correlation",
    ),
}


def params_dict(params: Any) -> dict[str, Any]:
    """The parameters as JSON values (tuples as lists), as a run's settings store them."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(params).items()}


def param_fields(params_type: type) -> list:
    """The dataclass fields of a study's parameters, in order."""
    return list(fields(params_type))
