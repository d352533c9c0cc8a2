"""hooked-vllm: TransformerLens-style interpretability for vision LLMs.

Example:
    >>> from hooked_vllm import HookedVLM
    >>> from hooked_vllm.tiny_models import tiny_llava
    >>> vlm = HookedVLM.from_hf(*tiny_llava())
    >>> vlm.cfg.n_layers
    3
"""

import logging as _logging

# transformer-lens sets the `transformers` logger to ERROR when it is imported; keep the level the
# user had (HF's loading reports and warnings stay visible).
import transformers as _transformers  # noqa: E402,F401  (configures its logger first)

_transformers_log_level = _logging.getLogger("transformers").level

from hooked_vllm.activations.store import ActivationStore  # noqa: E402
from hooked_vllm.errors import (  # noqa: E402
    BatchFormatError,
    CheckpointError,
    GenerationArgumentError,
    HookedVLMError,
    ImageCountError,
    ImageLoadError,
    MissingImageError,
    SequenceTooLongError,
    UnsupportedModelError,
)
from hooked_vllm.model import HookedVLM, VLMBatch, build_batch, positions_from_mask  # noqa: E402
from hooked_vllm.model.sae import SAE, SAEError, run_with_cache_with_saes, run_with_saes, vlm_saes  # noqa: E402

_logging.getLogger("transformers").setLevel(_transformers_log_level)

__version__ = "0.1.0"

__all__ = [
    "ActivationStore",
    "BatchFormatError",
    "CheckpointError",
    "GenerationArgumentError",
    "HookedVLM",
    "HookedVLMError",
    "SAE",
    "SAEError",
    "ImageCountError",
    "ImageLoadError",
    "MissingImageError",
    "SequenceTooLongError",
    "UnsupportedModelError",
    "VLMBatch",
    "build_batch",
    "positions_from_mask",
    "run_with_cache_with_saes",
    "run_with_saes",
    "vlm_saes",
]
