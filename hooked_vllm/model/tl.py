"""transformer-lens, imported for the whole package in one place, keeping the ``transformers`` log level.

transformer-lens sets the ``transformers`` logger to ERROR when it is imported, which hides Hugging
Face's loading reports and warnings from the user. Every module of hooked-vllm takes transformer-lens's
names from here, so the level the user had is put back right after the import.
"""

import logging

import transformers  # noqa: F401  (configures its logger before transformer-lens changes it)

_transformers_log_level = logging.getLogger("transformers").level

from transformer_lens import ActivationCache, utilities  # noqa: E402
from transformer_lens.hook_points import HookPoint  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402
from transformer_lens.model_bridge.sources.transformers.source import boot  # noqa: E402
from transformer_lens.utilities import Slice  # noqa: E402

logging.getLogger("transformers").setLevel(_transformers_log_level)

__all__ = ["ActivationCache", "HookPoint", "Slice", "TransformerBridge", "boot", "utilities"]
