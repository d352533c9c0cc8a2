"""The hooked model: takes a Hugging Face VLM and its processor, gives a TransformerLens-style model.

:class:`HookedVLM` boots the HF language backbone on transformer-lens's ``TransformerBridge`` and runs
it as HF does, with TransformerLens's hook names, ``run_with_cache`` and ``run_with_hooks``. Images
and prompts become a :class:`VLMBatch` (tensors, positions, and every position's modality); the rest of
this stage is what the model is made of: image loading (``images``), the activation cache (``cache``),
generation (``generation``), TransformerLens's token helpers (``text_tokens``), layers run as HF sdpa
with q/k/v taps (``observed_attention``) and SAEs spliced in by hook name (``sae``).

Example:
    >>> from hooked_vllm.model import HookedVLM
    >>> from hooked_vllm.tiny_models import tiny_llava
    >>> vlm = HookedVLM.from_hf(*tiny_llava())
    >>> vlm.cfg.n_layers
    3
"""

from hooked_vllm.model.batch import VLMBatch, build_batch, positions_from_mask
from hooked_vllm.model.hooked_vlm import HookedVLM

__all__ = ["HookedVLM", "VLMBatch", "build_batch", "positions_from_mask"]
