"""hooked-vllm: TransformerLens-style interpretability for vision LLMs.

The public names below load on first use, so ``import hooked_vllm`` (and ``hooked-vllm --help``) does
not import torch, transformers or transformer-lens.

Example:
    >>> from hooked_vllm import HookedVLM
    >>> vlm = HookedVLM.from_pretrained("demo")   # the demo model shipped with the package
    >>> vlm.cfg.n_layers
    6
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hooked_vllm.errors import (
    BatchFormatError,
    CheckpointError,
    GenerationArgumentError,
    HookedVLMError,
    HookOutputError,
    ImageCountError,
    ImageLoadError,
    LayerError,
    MissingImageError,
    ModelNotFoundError,
    ReturnTypeError,
    SequenceTooLongError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from hooked_vllm.activations.store import ActivationStore
    from hooked_vllm.model import HookedVLM, VLMBatch, build_batch, positions_from_mask
    from hooked_vllm.model.sae import SAE, SAEError, run_with_cache_with_saes, run_with_saes, vlm_saes

__version__ = "0.1.0"

#: public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "ActivationStore": "hooked_vllm.activations.store",
    "HookedVLM": "hooked_vllm.model",
    "VLMBatch": "hooked_vllm.model",
    "build_batch": "hooked_vllm.model",
    "positions_from_mask": "hooked_vllm.model",
    "SAE": "hooked_vllm.model.sae",
    "SAEError": "hooked_vllm.model.sae",
    "run_with_cache_with_saes": "hooked_vllm.model.sae",
    "run_with_saes": "hooked_vllm.model.sae",
    "vlm_saes": "hooked_vllm.model.sae",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hooked_vllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ActivationStore",
    "BatchFormatError",
    "CheckpointError",
    "GenerationArgumentError",
    "HookedVLM",
    "HookOutputError",
    "HookedVLMError",
    "ImageCountError",
    "ImageLoadError",
    "LayerError",
    "MissingImageError",
    "ModelNotFoundError",
    "ReturnTypeError",
    "SAE",
    "SAEError",
    "SequenceTooLongError",
    "UnsupportedModelError",
    "VLMBatch",
    "build_batch",
    "positions_from_mask",
    "run_with_cache_with_saes",
    "run_with_saes",
    "vlm_saes",
]
