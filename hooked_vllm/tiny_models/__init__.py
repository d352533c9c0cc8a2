"""Tiny random-initialised VLMs built in-process, with tokenizers trained in-process.

No hub access is needed: the configs come from ``transformers`` classes, the tokenizers are
trained by ``tokenizers`` on a small built-in corpus and saved to a directory (transformer-lens
wants a tokenizer loaded from a path), and the processors are built from their classes.

One module per family, as in :mod:`hooked_vllm.adapters` (``tiny_models/<family>.py`` with its
``tiny_<family>`` builder, found by :func:`family_builders`); what they share is in
:mod:`hooked_vllm.tiny_models.common`. Every processor survives ``save_pretrained`` then
``AutoProcessor.from_pretrained`` offline, with the same outputs.

These are what the tests, benchmarks and the offline demo run on.

Example:
    >>> from hooked_vllm.tiny_models import tiny_llava
    >>> hf_model, processor = tiny_llava(seed=0)
    >>> type(hf_model).__name__
    'LlavaForConditionalGeneration'
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

import torch

from hooked_vllm.tiny_models.common import IMAGE_TOKEN, TINY_VISION, TinyTextConfig, train_tokenizer
from hooked_vllm.tiny_models.gemma3 import tiny_gemma3
from hooked_vllm.tiny_models.instructblip import tiny_instructblip
from hooked_vllm.tiny_models.llava import tiny_llava
from hooked_vllm.tiny_models.llava_next import tiny_llava_next
from hooked_vllm.tiny_models.qwen2_vl import tiny_qwen2_5_vl, tiny_qwen2_vl

__all__ = [
    "IMAGE_TOKEN",
    "TINY_VISION",
    "TinyTextConfig",
    "family_builders",
    "tiny_gemma3",
    "tiny_instructblip",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "train_tokenizer",
]


def family_builders() -> dict[str, Callable[..., tuple[torch.nn.Module, Any]]]:
    """``{family: builder}`` for every tiny model: the ``tiny_<family>`` functions of this package's
    modules (``hooked_vllm/tiny_models/<family>.py``: a new family's builder goes there)."""
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    return {
        name[len("tiny_") :]: function
        for module in modules
        for name, function in sorted(vars(module).items())
        if name.startswith("tiny_")
        and inspect.isfunction(function)
        and function.__module__ == module.__name__
    }
