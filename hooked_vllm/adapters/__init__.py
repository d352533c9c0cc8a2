"""Model-family adapters and their registry.

To add a family: write ``adapters/<family>.py`` with a :class:`VLMAdapter` subclass (see
``adapters/base.py`` for the contract). Every module of this package is registered by the
``architectures`` its adapter classes declare: nothing else to edit.

A module is imported only when a model of one of its architectures is loaded (each imports its
family's HF modeling code, some of which is slow to import: Gemma 3n's pulls in timm). The
architectures are read from the modules' source (``architectures = ("...",)`` in a class body);
a module whose declaration is not a literal tuple of strings is imported at once instead.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from functools import cache
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter, causal_lm_view
from hooked_vllm.errors import UnsupportedModelError

#: modules of this package that hold no family
_SHARED_MODULES = ("base", "prompts", "tokens")


def declared_architectures(source: str) -> tuple[str, ...] | None:
    """The HF class names the ``architectures = (...)`` assignments in the class bodies of a module's
    ``source`` declare, or None where one is not a literal tuple of strings (import to know)."""
    found: list[str] = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for statement in node.body:
            if isinstance(statement, ast.Assign):
                targets, value = statement.targets, statement.value
            elif isinstance(statement, ast.AnnAssign):
                targets, value = [statement.target], statement.value
            else:
                continue
            if not any(isinstance(t, ast.Name) and t.id == "architectures" for t in targets):
                continue
            try:
                names = ast.literal_eval(value)
            except ValueError:
                return None
            if not (isinstance(names, tuple) and all(isinstance(name, str) for name in names)):
                return None
            found += names
    return tuple(found)


@cache
def _architecture_modules() -> dict[str, str]:
    """``{HF class name: module name}`` for every family module, from the modules' source; a module
    whose declaration cannot be read that way is imported now and asked."""
    modules: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _SHARED_MODULES:
            continue
        source = Path(__file__).parent / f"{info.name}.py"
        declared = declared_architectures(source.read_text()) if source.is_file() else None
        if declared is None:
            declared = [arch for adapter in _adapters_in(info.name) for arch in adapter.architectures]
        modules.update(dict.fromkeys(declared, info.name))
    return modules


def _adapters_in(module_name: str) -> list[type[VLMAdapter]]:
    """The concrete :class:`VLMAdapter` classes defined in ``adapters/<module_name>.py`` (imported)."""
    module = importlib.import_module(f"{__name__}.{module_name}")
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, VLMAdapter)
        and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
    ]


def _all_adapters() -> tuple[type[VLMAdapter], ...]:
    """Every concrete adapter class, by module name (imports every family module)."""
    return tuple(
        adapter
        for name in dict.fromkeys(sorted(_architecture_modules().values()))
        for adapter in _adapters_in(name)
    )


def __getattr__(name: str) -> Any:
    if name == "ADAPTERS":  # every adapter class: imports every family module, on first use
        value = _all_adapters()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supported_architectures() -> list[str]:
    return list(_architecture_modules())


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
    modules = _architecture_modules()
    for arch in architectures:
        if arch not in modules:
            continue
        for adapter in _adapters_in(modules[arch]):
            if arch in adapter.architectures:
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
