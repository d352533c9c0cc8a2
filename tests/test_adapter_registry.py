"""The adapter registry reads each family module's ``architectures`` from its source and imports a
module only when a model of its family is loaded (each imports its HF modeling code; Gemma 3n's
pulls in timm)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hooked_vllm import adapters
from hooked_vllm.adapters import declared_architectures, supported_architectures
from tests.conftest import ROOT


def test_the_architectures_read_from_source_are_those_the_imported_classes_declare():
    imported = {arch: adapter.__module__ for adapter in adapters.ADAPTERS for arch in adapter.architectures}
    assert supported_architectures() == list(adapters._architecture_modules())
    assert {
        arch: f"hooked_vllm.adapters.{module}" for arch, module in adapters._architecture_modules().items()
    } == (imported)
    assert "LlavaForConditionalGeneration" in imported and len(imported) >= 12


def test_a_declaration_that_is_not_a_literal_means_import_to_know():
    literal = 'class A:\n    architectures = ("X", "Y")\nclass B:\n    architectures: tuple = ("Z",)\n'
    assert declared_architectures(literal) == ("X", "Y", "Z")
    assert declared_architectures("class A:\n    architectures = NAMES\n") is None
    assert declared_architectures("class A:\n    architectures = [1]\n") is None


def test_loading_one_family_imports_no_other_family_module():
    script = (
        "import sys\n"
        "from transformers import LlavaConfig\n"
        "from hooked_vllm.adapters import adapter_class_for\n"
        "config = LlavaConfig(); config.architectures = ['LlavaForConditionalGeneration']\n"
        "print(adapter_class_for(config).__name__)\n"
        "print(' '.join(m for m in sys.modules if m.startswith('hooked_vllm.adapters.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True, timeout=300
    )
    name, modules = done.stdout.strip().splitlines()
    assert name == "LlavaAdapter"
    assert set(modules.split()) <= {
        "hooked_vllm.adapters.base",
        "hooked_vllm.adapters.prompts",
        "hooked_vllm.adapters.tokens",
        "hooked_vllm.adapters.llava",
    }


def test_an_unknown_architecture_names_every_supported_one():
    from transformers import LlavaConfig

    from hooked_vllm import UnsupportedModelError

    config = LlavaConfig()
    config.architectures = ["NoSuchForConditionalGeneration"]
    with pytest.raises(UnsupportedModelError, match="NoSuch.*Gemma4ForConditionalGeneration"):
        adapters.adapter_class_for(config)
