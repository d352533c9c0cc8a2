"""Loading from a local directory offline, and never spawning a process or touching the network."""

from __future__ import annotations

import copy
import os
import socket
import subprocess

import pytest
import torch
from transformers import InstructBlipConfig, LlamaConfig, T5Config

from hooked_vllm import HookedVLM, UnsupportedModelError
from hooked_vllm.adapters import adapter_class_for
from hooked_vllm.testing import tiny_instructblip, tiny_llava
from tests.conftest import INSTRUCTIONS, random_images

BUILDERS = {"llava": tiny_llava, "instructblip": tiny_instructblip}


@pytest.fixture
def forbid_processes_and_network(monkeypatch):
    """Any subprocess, os.system call or outbound socket connection fails the test."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"hooked-vllm tried to spawn a process or connect: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(os, "system", refuse)
    monkeypatch.setattr(os, "execv", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_from_pretrained_directory_offline_keeps_parity(
    name, tmp_path, monkeypatch, forbid_processes_and_network
):
    hf_model, processor = BUILDERS[name](seed=1, directory=tmp_path / "build")
    reference = copy.deepcopy(hf_model)
    hf_model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "model").iterdir())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    vlm = HookedVLM.from_pretrained(str(tmp_path / "model"))
    batch = vlm.prepare(random_images(3), INSTRUCTIONS)
    logits = vlm(batch)
    expected = reference(**batch.inputs, position_ids=batch.position_ids).logits
    real = batch.attention_mask.bool()
    assert (logits - expected)[real].abs().max() <= 1e-5
    assert vlm.generate(batch, max_new_tokens=3).shape[0] == 3
    assert forbid_processes_and_network == []


def test_boot_without_hub_variables_never_waits_or_spawns(
    tmp_path, monkeypatch, forbid_processes_and_network
):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    vlm = HookedVLM.from_hf(*tiny_llava(directory=tmp_path))
    vlm.run_with_cache(vlm.prepare(random_images(1), INSTRUCTIONS[:1]))
    assert forbid_processes_and_network == []


def test_torchvision_is_importable_so_transformer_lens_never_installs_it():
    import torchvision  # noqa: F401
    from transformer_lens.model_bridge.sources.transformers import helpers

    assert helpers._ensure_torchvision() is True


def test_unsupported_architecture_is_refused_before_loading(tmp_path):
    config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)  # no weights at all: the refusal must come from the config
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        HookedVLM.from_pretrained(str(tmp_path))


def test_cross_attention_vlm_is_refused_with_the_reason(tmp_path):
    from transformers import MllamaConfig

    config = MllamaConfig()
    config.architectures = ["MllamaForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="cross-attention.*LlavaForConditionalGeneration"):
        HookedVLM.from_pretrained(str(tmp_path))


def test_instructblip_flan_t5_is_refused():
    config = InstructBlipConfig(text_config=T5Config(d_model=16, num_layers=1).to_dict())
    config.architectures = ["InstructBlipForConditionalGeneration"]
    assert not config.use_decoder_only_language_model
    with pytest.raises(UnsupportedModelError, match="decoder-only"):
        adapter_class_for(config)


def test_config_without_architectures_gets_a_fix_in_the_message(tmp_path):
    hf_model, processor = tiny_llava(directory=tmp_path)
    hf_model.config.architectures = None
    with pytest.raises(UnsupportedModelError, match="config.architectures"):
        HookedVLM.from_hf(hf_model, processor)


def test_float16_model_runs_and_tracks_float32(tmp_path):
    hf_model, processor = tiny_llava(directory=tmp_path)
    reference = copy.deepcopy(hf_model)
    vlm = HookedVLM.from_hf(hf_model.to(torch.bfloat16), processor)
    batch = vlm.prepare(random_images(2), INSTRUCTIONS[:2])
    logits = vlm(batch)
    assert logits.dtype == torch.bfloat16
    expected = reference(**batch.inputs, position_ids=batch.position_ids).logits
    real = batch.attention_mask.bool()
    assert (logits.float() - expected)[real].abs().max() / expected.abs().max() < 0.05
