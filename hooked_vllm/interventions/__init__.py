"""Causal interventions in TransformerLens style: hooks and context managers that compose with the
user's own hooks and are always removed afterwards (errors included)."""

from hooked_vllm.interventions.knockout import (
    blocked_edges,
    group_mask,
    knockout,
    knockout_hooks,
    knockout_sweep,
)
from hooked_vllm.interventions.metrics import kl_from, last_logits, logit_diff, target_prob
from hooked_vllm.interventions.patching import (
    LAYER_HOOKS,
    PatchingError,
    PatchingResult,
    patch_by_modality,
    patch_hook,
)
from hooked_vllm.interventions.pruning import (
    METHODS,
    PruningPoint,
    compute_saved,
    prune,
    pruning_curve,
    pruning_hooks,
    select_image_tokens,
)

__all__ = [
    "LAYER_HOOKS",
    "METHODS",
    "PatchingError",
    "PatchingResult",
    "PruningPoint",
    "blocked_edges",
    "compute_saved",
    "group_mask",
    "kl_from",
    "knockout",
    "knockout_hooks",
    "knockout_sweep",
    "last_logits",
    "logit_diff",
    "patch_by_modality",
    "patch_hook",
    "prune",
    "pruning_curve",
    "pruning_hooks",
    "select_image_tokens",
    "target_prob",
]
