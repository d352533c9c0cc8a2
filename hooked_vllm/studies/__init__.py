"""Studies: published VLM interpretability experiments, each as one call and one command.

Takes a hooked model (:mod:`hooked_vllm.model`), dataset items (:mod:`hooked_vllm.runs`) and the
interventions (:mod:`hooked_vllm.interventions`); gives a resumable run on the run store
(:class:`~hooked_vllm.runs.store.ResultStore`), aggregates and one HTML report per study.

- ``knockout``: attention knockout windows (Zhang et al. 2024, arXiv 2411.18620)
- ``pruning``: visual-token pruning after layer K (FastV, arXiv 2403.06764; FEATHER's position bias,
  arXiv 2412.13180)
- ``object-ablation``: object-token ablation and the logit lens at the object (Neo et al. 2024,
  arXiv 2410.07149)
- ``attribution``: attribution patching beside real activation patching (Nanda 2023; Syed et al. 2023;
  Kramar et al. 2024)

A study is parameters (the paper's setting as defaults), a per-item function, an aggregation and a
report (:mod:`hooked_vllm.studies.base`). The names below load on first use, so the command line's
``--help`` reads the parameters (:mod:`hooked_vllm.studies.params`) without importing torch.

Example:
    >>> from hooked_vllm.studies import KnockoutStudy, run_study  # doctest: +SKIP
    >>> result = run_study(KnockoutStudy(), vlm, load_shapes("shapes/"), "knockout-out/")  # doctest: +SKIP
    >>> KnockoutStudy().write_report("knockout-out/", result.aggregates, "demo")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hooked_vllm.studies.params import (
    STUDIES,
    AttributionParams,
    KnockoutParams,
    ObjectAblationParams,
    PruningParams,
)

if TYPE_CHECKING:
    from hooked_vllm.studies.attribution_study import AttributionStudy
    from hooked_vllm.studies.base import Study, StudyResult, run_study
    from hooked_vllm.studies.knockout import KnockoutStudy
    from hooked_vllm.studies.object_ablation import ObjectAblationStudy
    from hooked_vllm.studies.pruning import PruningStudy

_LAZY = {
    "Study": "hooked_vllm.studies.base",
    "StudyResult": "hooked_vllm.studies.base",
    "run_study": "hooked_vllm.studies.base",
    "KnockoutStudy": "hooked_vllm.studies.knockout",
    "PruningStudy": "hooked_vllm.studies.pruning",
    "ObjectAblationStudy": "hooked_vllm.studies.object_ablation",
    "AttributionStudy": "hooked_vllm.studies.attribution_study",
}

__all__ = [
    "STUDIES",
    "AttributionParams",
    "AttributionStudy",
    "KnockoutParams",
    "KnockoutStudy",
    "ObjectAblationParams",
    "ObjectAblationStudy",
    "PruningParams",
    "PruningStudy",
    "Study",
    "StudyResult",
    "get_study",
    "run_study",
]


def get_study(name: str) -> type:
    """The study class of ``name`` (a key of :data:`STUDIES`)."""
    if name not in STUDIES:
        raise KeyError(f"No study {name!r}: the studies are {', '.join(STUDIES)}.")
    module = importlib.import_module(STUDIES[name][1])
    return next(
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and getattr(value, "name", None) == name
        and value.__module__ == module.__name__
    )


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hooked_vllm.studies' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
