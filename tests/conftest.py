"""Shared fixtures: tiny random models of both families (with untouched HF copies as references)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vllm import HookedVLM, UnsupportedModelError
from hooked_vllm.testing import tiny_instructblip, tiny_llava
from hooked_vllm.tiny_models import family_builders

ROOT = Path(__file__).resolve().parents[1]

torch.set_grad_enabled(False)

BUILDERS = {"llava": tiny_llava, "instructblip": tiny_instructblip}
#: the families of "any visual-prefix VLM" (tiles, M-RoPE, bidirectional image blocks...): every
#: other tiny builder (hooked_vllm/tiny_models/<family>.py for a new one)
NEW_BUILDERS = {name: builder for name, builder in family_builders().items() if name not in BUILDERS}
#: (width, height) of the images of a family batch: tiles, grids and token counts differ per item
FAMILY_IMAGE_SIZES = [(48, 24), (24, 48), (40, 40)]
INSTRUCTIONS = ["Describe the image.", "What colour?", "How many shapes are there in the picture now?"]


class Family:
    """A tiny model wrapped as HookedVLM, with a deep copy of the untouched HF model as reference."""

    def __init__(self, name: str, tmp_dir) -> None:
        self.name = name
        try:
            hf_model, processor = {**BUILDERS, **NEW_BUILDERS}[name](seed=0, directory=tmp_dir)
            self.reference = copy.deepcopy(hf_model)
            self.processor = processor
            self.vlm = HookedVLM.from_hf(hf_model, processor)
        except UnsupportedModelError as error:  # a family newer than the installed transformers, or
            # one needing an optional extra that is not installed (Gemma 3n: timm)
            if "needs transformers" not in str(error) and 'pip install "hooked-vllm[' not in str(error):
                raise
            pytest.skip(str(error))


@pytest.fixture(scope="session", params=sorted(BUILDERS))
def family(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session", params=sorted(NEW_BUILDERS))
def new_family(request, tmp_path_factory) -> Family:
    """Every family but LLaVA-1.5 and InstructBLIP (``family``), each tiny, with its untouched HF copy."""
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def family_images(seed: int = 0) -> list[Image.Image]:
    """Three images of different sizes and aspect ratios (:data:`FAMILY_IMAGE_SIZES`)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in FAMILY_IMAGE_SIZES]


def hf_forward_inputs(family: Family, batch) -> dict:
    """What the untouched HF model is called with for ``batch``: the processor's tensors, plus the
    positions where HF would otherwise count padding (Qwen derives its M-RoPE positions itself)."""
    inputs = dict(batch.inputs)
    if batch.position_ids.dim() == 2:
        inputs["position_ids"] = batch.position_ids
    return inputs


def hf_text_parts(reference) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The untouched HF model's text decoder (its layers and final norm) and its unembedding: under
    ``model`` for most families, a whole ``*ForCausalLM`` under ``language_model`` for BLIP-2."""
    if hasattr(reference, "model"):
        return reference.model.get_decoder(), reference.lm_head
    language_model = reference.language_model
    decoder = language_model.get_decoder()
    if decoder is language_model:  # Llama 4: get_decoder finds no decoder under its own name
        decoder = language_model.model
    return decoder, language_model.get_output_embeddings()


def hf_lm_outputs(output):
    """The language model's part of an HF output (``hidden_states``, ``attentions``): the output
    itself, or BLIP-2's ``language_model_outputs``."""
    return getattr(output, "language_model_outputs", None) or output


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


# ---------------------------------------------------------------- fixture datasets
def make_coco(root: Path, n_images: int = 6, year: int = 2014) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / f"val{year}").mkdir()
    images, annotations = [], []
    for i, image in enumerate(random_images(n_images, seed=5)):
        name = f"COCO_val{year}_{i:012d}.jpg"
        image.save(root / f"val{year}" / name)
        images.append({"id": 100 + i, "file_name": name, "width": image.width, "height": image.height})
        annotations.append({"id": i, "image_id": 100 + i, "caption": f"a test picture number {i}"})
    data = {"images": images, "annotations": annotations}
    (root / "annotations" / f"captions_val{year}.json").write_text(json.dumps(data))
    return root


def make_winoground(root: Path, n_examples: int = 3) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n_examples):
        for j, image in enumerate(random_images(2, seed=10 + i)):
            image.save(root / "images" / f"ex_{i}_img_{j}.png")
        lines.append(
            json.dumps(
                {
                    "id": i,
                    "image_0": f"ex_{i}_img_0",
                    "image_1": f"ex_{i}_img_1",
                    "caption_0": "the cat is on the mat",
                    "caption_1": "the mat is on the cat",
                    "tag": "Object",
                    "secondary_tag": "",
                    "num_main_preds": 1,
                    "collapsed_tag": "Object",
                }
            )
        )
    (root / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("saved-tiny-llava")
    hf_model, processor = tiny_llava(seed=2, directory=directory / "build")
    hf_model.save_pretrained(directory / "model")
    processor.save_pretrained(directory / "model")
    return directory / "model"


def cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "hooked_vllm.cli", "phase-diagram", "--no-progress", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
