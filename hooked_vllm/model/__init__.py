"""The hooked model: takes a Hugging Face VLM and its processor, gives a TransformerLens-style model.

:class:`HookedVLM` boots the HF language backbone on transformer-lens's ``TransformerBridge`` and runs
it as HF does, with TransformerLens's hook names, ``run_with_cache`` and ``run_with_hooks``. Images
and prompts become a :class:`VLMBatch` (tensors, positions, and every position's modality); the rest of
this stage is what the model is made of: where a model comes from (``loading``), image loading
(``images``), the activation cache (``cache``), generation (``generation``), the loss (``loss``),
TransformerLens's token helpers (``text_tokens``), layer numbers (``layers``), layers run as HF sdpa
with q/k/v taps (``observed_attention``), SAEs spliced in by hook name (``sae``), and transformer-lens
itself (``tl``). The names below load on first use, so ``hooked_vllm.model.loading`` can check a model
source without importing torch's heavier neighbours.

Example:
    >>> from hooked_vllm.model import HookedVLM
    >>> vlm = HookedVLM.from_pretrained("demo")
    >>> vlm.cfg.n_layers
    6
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hooked_vllm.model.batch import VLMBatch, build_batch, positions_from_mask
    from hooked_vllm.model.hooked_vlm import HookedVLM

_LAZY = {
    "HookedVLM": "hooked_vllm.model.hooked_vlm",
    "VLMBatch": "hooked_vllm.model.batch",
    "build_batch": "hooked_vllm.model.batch",
    "positions_from_mask": "hooked_vllm.model.batch",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hooked_vllm.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["HookedVLM", "VLMBatch", "build_batch", "positions_from_mask"]
