"""The hooked model: takes a Hugging Face VLM and its processor, gives a TransformerLens-style model.

:class:`HookedVLM` boots the HF language backbone on transformer-lens's ``TransformerBridge`` and runs
it as HF does, with TransformerLens's hook names, ``run_with_cache`` and ``run_with_hooks``. Images
and prompts become a :class:`VLMBatch` (tensors, positions, and every position's modality); the rest of
this stage is what the model is made of: image loading (``images``), the activation cache (``cache``),
generation (``generation``), TransformerLens's token helpers (``text_tokens``), layers run as HF sdpa
with q/k/v taps (``observed_attention``) and SAEs spliced in by hook name (``sae``).

Example:
    >>> from hooked_vllm.model import HookedVLM
    >>> vlm = HookedVLM.from_pretrained("demo")
    >>> vlm.cfg.n_layers
    6
"""

import logging

import transformers  # noqa: F401  (configures its logger before transformer-lens changes it)

# transformer-lens sets the `transformers` logger to ERROR when it is imported; keep the level the user
# had (HF's loading reports and warnings stay visible). Every module of the package that imports
# transformer-lens lies in this stage, so this runs first.
_transformers_log_level = logging.getLogger("transformers").level
import transformer_lens  # noqa: E402,F401

logging.getLogger("transformers").setLevel(_transformers_log_level)

from hooked_vllm.model.batch import VLMBatch, build_batch, positions_from_mask  # noqa: E402
from hooked_vllm.model.hooked_vlm import HookedVLM  # noqa: E402

__all__ = ["HookedVLM", "VLMBatch", "build_batch", "positions_from_mask"]
