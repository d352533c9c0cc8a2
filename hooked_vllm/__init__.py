"""hooked-vllm: TransformerLens-style interpretability for vision LLMs.

Example:
    >>> from hooked_vllm import HookedVLM
    >>> from hooked_vllm.testing import tiny_llava
    >>> vlm = HookedVLM.from_hf(*tiny_llava())
    >>> vlm.cfg.n_layers
    3
"""

from hooked_vllm.errors import (
    BatchFormatError,
    HookedVLMError,
    ImageCountError,
    ImageLoadError,
    MissingImageError,
    SequenceTooLongError,
    UnsupportedModelError,
)
from hooked_vllm.inputs import VLMBatch, build_batch, positions_from_mask
from hooked_vllm.model import HookedVLM

__version__ = "0.1.0"

__all__ = [
    "BatchFormatError",
    "HookedVLM",
    "HookedVLMError",
    "ImageCountError",
    "ImageLoadError",
    "MissingImageError",
    "SequenceTooLongError",
    "UnsupportedModelError",
    "VLMBatch",
    "build_batch",
    "positions_from_mask",
]
