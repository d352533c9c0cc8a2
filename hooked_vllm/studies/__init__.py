"""Studies: published VLM interpretability experiments, each as one call and one command.

Takes a hooked model (:mod:`hooked_vllm.model`), dataset items (:mod:`hooked_vllm.runs`) and the
interventions (:mod:`hooked_vllm.interventions`); gives a resumable run on the run store
(:class:`~hooked_vllm.runs.store.ResultStore`), aggregates and one HTML report per study.

- ``knockout``: attention knockout windows (Zhang et al. 2024, arXiv 2411.18620)
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

from hooked_vllm.studies.params import STUDIES, AttributionParams, KnockoutParams

if TYPE_CHECKING:
    from hooked_vllm.studies.attribution_study import AttributionStudy
    from hooked_vllm.studies.base import Study, StudyResult, run_study
    from hooked_vllm.studies.knockout import KnockoutStudy

_LAZY = {
    "Study": "hooked_vllm.studies.base",
    "StudyResult": "hooked_vllm.studies.base",
    "run_study": "hooked_vllm.studies.base",
    "KnockoutStudy": "hooked_vllm.studies.knockout",
    "AttributionStudy": "hooked_vllm.studies.attribution_study",
}

__all__ = [
    "STUDIES",
    "AttributionParams",
    "AttributionStudy",
    "KnockoutParams",
    "KnockoutStudy",
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
