"""Shared fixtures: tiny random models of both families (with untouched HF copies as references)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vllm import HookedVLM
from hooked_vllm.testing import tiny_instructblip, tiny_llava

torch.set_grad_enabled(False)

BUILDERS = {"llava": tiny_llava, "instructblip": tiny_instructblip}
INSTRUCTIONS = ["Describe the image.", "What colour?", "How many shapes are there in the picture now?"]


class Family:
    """A tiny model wrapped as HookedVLM, with a deep copy of the untouched HF model as reference."""

    def __init__(self, name: str, tmp_dir) -> None:
        self.name = name
        hf_model, processor = BUILDERS[name](seed=0, directory=tmp_dir)
        self.reference = copy.deepcopy(hf_model)
        self.processor = processor
        self.vlm = HookedVLM.from_hf(hf_model, processor)


@pytest.fixture(scope="session", params=sorted(BUILDERS))
def family(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def llava(tmp_path_factory) -> Family:
    return Family("llava", tmp_path_factory.mktemp("llava-single"))


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (30, 30), (64, 48), (33, 71)]
    return [Image.fromarray((rng.random((*sizes[i % 4], 3)) * 255).astype("uint8")) for i in range(n)]


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return random_images(3)
