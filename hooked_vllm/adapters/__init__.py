"""Model-family adapters and their registry.

To add a family: write ``adapters/<family>.py`` with a :class:`VLMAdapter` subclass and add it to
``ADAPTERS`` below.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter, causal_lm_view
from hooked_vllm.adapters.gemma3 import Gemma3Adapter
from hooked_vllm.adapters.instructblip import InstructBlipAdapter
from hooked_vllm.adapters.llava import LlavaAdapter
from hooked_vllm.adapters.llava_next import LlavaNextAdapter
from hooked_vllm.adapters.qwen2_vl import Qwen2VLAdapter
from hooked_vllm.errors import UnsupportedModelError

ADAPTERS: tuple[type[VLMAdapter], ...] = (
    LlavaAdapter,
    InstructBlipAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    Gemma3Adapter,
)


def supported_architectures() -> list[str]:
    return [arch for adapter in ADAPTERS for arch in adapter.architectures]


#: VLMs that do not feed their language model a visual prefix, with the reason
NOT_A_VISUAL_PREFIX = {
    "MllamaForConditionalGeneration": (
        "Llama-3.2-Vision (Mllama) feeds the image to its language model through cross-attention "
        "layers, not as a visual prefix of image tokens, so there are no image positions for "
        "hooked-vllm's analyses to read"
    ),
}


def adapter_class_for(config: PretrainedConfig) -> type[VLMAdapter]:
    """The adapter serving ``config``'s architecture, or :class:`UnsupportedModelError`."""
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        if arch in NOT_A_VISUAL_PREFIX:
            raise UnsupportedModelError(
                f"{arch} is not supported: {NOT_A_VISUAL_PREFIX[arch]}. hooked-vllm supports "
                f"{supported_architectures()}."
            )
    for adapter in ADAPTERS:
        if any(arch in adapter.architectures for arch in architectures):
            adapter.check_config(config)
            return adapter
    raise UnsupportedModelError(
        f"Unsupported architecture {architectures or type(config).__name__!r}. hooked-vllm supports "
        f"{supported_architectures()} (decoder-only language models fed a visual prefix). For a model "
        "built in code, set config.architectures = [type(model).__name__]; to support a new family, "
        "add an adapter module under hooked_vllm/adapters/ (see adapters/base.py for the contract)."
    )


__all__ = [
    "ADAPTERS",
    "Gemma3Adapter",
    "ImageSlots",
    "InstructBlipAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "Qwen2VLAdapter",
    "VLMAdapter",
    "adapter_class_for",
    "causal_lm_view",
    "supported_architectures",
]
