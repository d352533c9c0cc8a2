"""Model-family adapters and their registry.

To add a family: write ``adapters/<family>.py`` with a :class:`VLMAdapter` subclass (see
``adapters/base.py`` for the contract). Every module of this package is read on import and each
concrete adapter class in it registered in ``ADAPTERS``: nothing else to edit.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from transformers import PretrainedConfig

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter, causal_lm_view
from hooked_vllm.errors import UnsupportedModelError

#: modules of this package that hold no family
_SHARED_MODULES = ("base", "prompts", "tokens")


def _discover_adapters() -> tuple[type[VLMAdapter], ...]:
    """Every concrete :class:`VLMAdapter` defined in a module of this package, by module name."""
    found: list[type[VLMAdapter]] = []
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name in _SHARED_MODULES:
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        found += [
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj)
            and issubclass(obj, VLMAdapter)
            and obj.__module__ == module.__name__
            and not inspect.isabstract(obj)
        ]
    return tuple(found)


ADAPTERS: tuple[type[VLMAdapter], ...] = _discover_adapters()


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
            adapter.check_transformers()
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
    "ImageSlots",
    "VLMAdapter",
    "adapter_class_for",
    "causal_lm_view",
    "supported_architectures",
]
