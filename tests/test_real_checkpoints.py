"""Four families against Hugging Face on their real checkpoint files (configs, processors, tokenizers,
chat templates, weight index; no weights), from ``../shared/real-checkpoints``.

Each model is built from its real ``config.json`` with every width, vocabulary and image size kept
(so image-token counts are the real ones) but fewer layers, and random weights (seeded), saved with
``save_pretrained`` next to the real tokenizer, processor and chat-template files, then loaded from
that folder as a user would: :meth:`HookedVLM.from_pretrained` (what the CLI calls) and the HF class
(eager, float32) as the reference. Compared: the prompt against the processor's chat template as the
model card uses it, the tokens against the processor's, image-token counts for several image sizes
(the real ones, written out), the image mask (structure tokens excluded) and attention mask, logits
on a padded batch of two, left- and right-padded (1e-5 on real positions), and the saved tensor
names against the real checkpoint's weight index. The shared folder sits beside the checkout
(``../shared``); without it every test here is skipped. Real widths make these models 0.3-2.8 GB in
float32: one is built at a time (a module-scoped fixture per checkpoint), held twice (ours and HF's:
9.5 GB of memory at most, Qwen3-VL's) and freed after its tests; the file takes about 80 s of CPU time.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.initialization import no_init_weights

from hooked_vllm import HookedVLM, UnsupportedModelError
from hooked_vllm.cli import main as cli_main
from tests.conftest import make_coco

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real-checkpoints"
TOL = 1e-5
#: files of a real folder that the saved model writes itself (config) or that are not the model's
NOT_COPIED = {"README.md", "config.json", "model.safetensors.index.json"}
QUESTION = "What is shown in this image?"
SHORT = "Describe it."
#: the padded batch's questions, the shorter with the smaller image: lengths differ in every family
QUESTIONS = (SHORT, QUESTION)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not REAL.is_dir(),
        reason=f"no real checkpoint files at {REAL} (the shared folder beside the checkout)",
    ),
]


@dataclass(frozen=True)
class Checkpoint:
    """One real checkpoint folder and how it is cut down."""

    folder: str
    text_layers: int
    #: vision-config fields set on the real config (the tower's depth and what depends on it)
    vision: dict
    #: the content of the model card's user message: the image and the question in the card's order
    card_content: tuple[str, ...]
    #: image-token counts of images of (width, height), as the real processor gives them
    counts: dict = field(default_factory=dict)
    #: the two images of the padded batch whose logits are compared
    batch_sizes: tuple = ((56, 56), (100, 60))
    #: ``(pattern, replacement)``: where ``save_pretrained`` names a tensor otherwise than the real
    #: checkpoint does, the file is rewritten with the real name (what a user downloads and loads)
    renames: tuple = ()


CHECKPOINTS = {
    "llava-1.5": Checkpoint(
        "llava-1.5-7b-hf",
        text_layers=1,
        # vision_feature_layer -2: the features are the first layer's output, the second's is unused
        # (as the real tower's last layer is)
        vision={"num_hidden_layers": 2},
        card_content=("text", "image"),  # the card's order; its template writes images first
        # 336 px centre crop, patch 14, CLS dropped: 24 x 24 whatever the image size
        counts={(56, 56): 576, (100, 60): 576, (336, 336): 576, (640, 480): 576},
        # transformers 5.23 saves the CLIP tower without its ``vision_model.`` level; the hub file has it
        renames=((r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),),
    ),
    "qwen2.5-vl": Checkpoint(
        "qwen2.5-vl-3b-instruct",
        text_layers=2,
        # a windowed block then a full-attention one, as the real tower alternates them
        vision={"depth": 2, "fullatt_block_indexes": [1]},
        card_content=("image", "text"),
        # sides rounded to multiples of 28 (patch 14 x merge 2), at least 56 x 56; one token per 28 x 28
        counts={(56, 56): 4, (100, 60): 8, (336, 336): 144, (640, 480): 391},
    ),
    "qwen3-vl": Checkpoint(
        "qwen3-vl-4b-instruct",
        text_layers=2,
        # DeepStack from both vision blocks, added after text layers 0 and 1
        vision={"depth": 2, "deepstack_visual_indexes": [0, 1]},
        card_content=("image", "text"),
        # sides rounded to multiples of 32 (patch 16 x merge 2), at least 65536 pixels
        counts={(56, 56): 64, (100, 60): 77, (336, 336): 100, (640, 480): 300},
    ),
    "smolvlm": Checkpoint(
        "smolvlm-256m-instruct",
        text_layers=2,
        vision={"num_hidden_layers": 1},
        card_content=("image", "text"),
        # longest edge resized to 2048, tiles of 512 + the global image, 64 tokens each
        counts={(56, 56): 17 * 64, (100, 60): 13 * 64, (400, 40): 5 * 64, (1024, 512): 9 * 64},
        batch_sizes=((400, 40), (40, 300)),  # the fewest tiles: 4 x 1 and 1 x 4, and the global image
    ),
}


INDEX = "model.safetensors.index.json"
#: the checkpoints whose real files include the weight index (the others ship one weight file)
WITH_INDEX = [name for name, c in CHECKPOINTS.items() if (REAL / c.folder / INDEX).is_file()]


def image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    width, height = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def real_config(checkpoint: Checkpoint) -> transformers.PretrainedConfig:
    config = transformers.AutoConfig.from_pretrained(REAL / checkpoint.folder)
    text = config.get_text_config()
    text.num_hidden_layers = checkpoint.text_layers
    if getattr(text, "layer_types", None):  # one entry per layer (all full attention here)
        text.layer_types = text.layer_types[: checkpoint.text_layers]
    for name, value in checkpoint.vision.items():
        setattr(config.vision_config, name, value)
    return config


#: length of the random pool the weights are cut from: a prime, so that no two rows of a matrix
#: (whatever its width) are equal
POOL = 4_194_301


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and seeded: matrices and biases N(0, 0.02), norm scales N(1, 0.1) (no
    parameter left constant, which would hide bugs). Each is a window, at a random offset, of one
    seeded pool of normal draws (wrapping round): drawing 2 GB of normals one by one takes seconds."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL, generator=generator)
    scaled = {"weight": pool * 0.02, "scale": 1.0 + pool * 0.1}
    for name, param in model.named_parameters():
        source = scaled["weight" if param.dim() > 1 or name.endswith("bias") else "scale"]
        flat, start, done = param.data.view(-1), int(torch.randint(POOL, (1,), generator=generator)), 0
        while done < flat.numel():
            take = min(POOL - start, flat.numel() - done)
            flat[done : done + take] = source[start : start + take]
            done, start = done + take, 0


def sample(param: torch.Tensor) -> torch.Tensor:
    """64 values spread over a parameter: with random weights, enough to tell any two apart."""
    flat = param.detach().flatten()
    return flat[:: max(1, flat.numel() // 64)].clone()


def build_and_save(checkpoint: Checkpoint, directory: Path) -> dict[str, torch.Tensor]:
    """The cut-down model, saved into ``directory`` beside copies of the real files; returns a
    :func:`sample` of every parameter, to check what loading puts where."""
    config = real_config(checkpoint)
    with no_init_weights():
        model = getattr(transformers, config.architectures[0])(config)
    model.tie_weights()  # Qwen's head is its embedding (tie_word_embeddings), as in the real file
    randomize(model, seed=0)
    model.eval().save_pretrained(directory)
    if checkpoint.renames:
        rename_tensors(directory / "model.safetensors", checkpoint.renames)
    fingerprints = {name: sample(param) for name, param in model.named_parameters()}
    del model
    for source in (REAL / checkpoint.folder).iterdir():
        if source.name not in NOT_COPIED:
            shutil.copy(source, directory / source.name)  # generation_config.json: the real one
    return fingerprints


def rename_tensors(path: Path, renames: tuple) -> None:
    """Rewrite a safetensors file with each tensor's name passed through ``renames``."""
    tensors = load_file(path)
    for pattern, replacement in renames:
        tensors = {re.sub(pattern, replacement, name): tensor for name, tensor in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt"})


class Loaded:
    """A checkpoint saved and loaded: the HookedVLM, the HF reference and the processor."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.checkpoint = CHECKPOINTS[name]
        self.directory = directory
        if not (REAL / self.checkpoint.folder / "config.json").is_file():
            pytest.skip(f"no {self.checkpoint.folder} in {REAL}")
        self.fingerprints = build_and_save(self.checkpoint, directory)
        gc.collect()
        try:
            self.vlm = HookedVLM.from_pretrained(str(directory))
        except UnsupportedModelError as error:  # a family newer than the installed transformers
            if "needs transformers" not in str(error):
                raise
            pytest.skip(str(error))
        config = transformers.AutoConfig.from_pretrained(directory)
        self.reference = (
            getattr(transformers, config.architectures[0])
            .from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
            .eval()
        )
        self.processor = transformers.AutoProcessor.from_pretrained(directory)

    @property
    def config(self) -> transformers.PretrainedConfig:
        return self.reference.config

    def card_prompt(self, question: str) -> str:
        """The prompt as the model card builds it: ``processor.apply_chat_template`` on one user turn."""
        parts = {"image": {"type": "image"}, "text": {"type": "text", "text": question}}
        messages = [{"role": "user", "content": [parts[kind] for kind in self.checkpoint.card_content]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def processor_inputs(self, sizes, questions, padding_side="left"):
        """What the model card's code gives the model: the processor on its prompts and images."""
        images = [image(size, seed=i) for i, size in enumerate(sizes)]
        if self.name == "smolvlm":  # the Idefics3 processor takes one list of images per prompt
            images = [[img] for img in images]
        return self.processor(
            images=images,
            text=[self.card_prompt(q) for q in questions],
            return_tensors="pt",
            padding=True,
            padding_side=padding_side,
        )

    def prepare(self, sizes, questions, padding_side="left"):
        images = [image(size, seed=i) for i, size in enumerate(sizes)]
        return self.vlm.prepare(images, list(questions), padding_side=padding_side)


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def loaded(request, tmp_path_factory):
    model = Loaded(request.param, tmp_path_factory.mktemp(f"real-{request.param}"))
    yield model
    directory = model.directory
    del model
    gc.collect()
    shutil.rmtree(directory, ignore_errors=True)  # 0.3-2.8 GB of weights


def hf_logits(loaded: Loaded, batch) -> torch.Tensor:
    """HF's logits on ``batch``'s processor tensors, called as HF's own forward is: Qwen derives its
    M-RoPE positions itself; the others are given positions counted over real tokens (HF counts
    padding too, which under left padding only shifts every position of an item alike)."""
    inputs = dict(batch.inputs)
    if batch.position_ids.dim() == 2:
        inputs["position_ids"] = batch.position_ids
    return loaded.reference(**inputs).logits


# ---------------------------------------------------------------- prompts and tokens
def test_prompt_is_the_model_cards_chat_template(loaded):
    """The adapter's prompt is what the processor's chat template writes for the model card's
    message, and its tokens are the processor's (image tokens expanded as the processor does)."""
    vlm = loaded.vlm
    for question in (QUESTION, SHORT):
        prompt, (start, end) = vlm.adapter.format_prompt(question, 1)
        assert prompt == loaded.card_prompt(question)
        assert prompt[start:end] == question
    sizes, questions = loaded.checkpoint.batch_sizes, QUESTIONS
    batch = loaded.prepare(sizes, questions)
    expected = loaded.processor_inputs(sizes, questions)
    assert batch.prompts == [loaded.card_prompt(q) for q in questions]
    assert torch.equal(batch.input_ids, expected["input_ids"])
    for item, question in enumerate(questions):  # the instruction is exactly the text tokens
        assert vlm.tokenizer.decode(batch.input_ids[item][batch.text_mask[item]]).strip() == question


def test_image_token_counts_are_the_real_ones(loaded):
    """For each image size: the image positions the batch marks, the slots of its layout and the
    processor's image tokens are the real checkpoint's count."""
    image_token = loaded.vlm.adapter.image_token_id
    for size, count in loaded.checkpoint.counts.items():
        batch = loaded.prepare([size], [QUESTION])
        expected = loaded.processor_inputs([size], [QUESTION])
        assert int((expected["input_ids"] == image_token).sum()) == count, size
        assert int(batch.image_mask.sum()) == count, size
        assert sum(int(slots.is_patch.sum()) for slots in batch.image_slots[0]) == count, size
        if "image_grid_thw" in batch.inputs:  # Qwen: one token per merged patch of the grid
            merge = loaded.config.vision_config.spatial_merge_size
            assert int(batch.inputs["image_grid_thw"].prod(-1).sum()) // merge**2 == count


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_masks_match_the_processor(loaded, padding_side):
    """The attention mask is the processor's (and is what the language model gets); the image mask is
    exactly the image-token positions, the structure tokens around them (Qwen's vision start/end,
    SmolVLM's tile markers) special, neither image nor text."""
    vlm, config = loaded.vlm, loaded.config
    sizes, questions = loaded.checkpoint.batch_sizes, QUESTIONS
    batch = loaded.prepare(sizes, questions, padding_side)
    expected = loaded.processor_inputs(sizes, questions, padding_side)
    assert torch.equal(batch.attention_mask, expected["attention_mask"])
    assert batch.attention_mask.min() == 0, "the batch must be padded"
    assert vlm.adapter.plain_causal
    embeds = torch.zeros(*batch.input_ids.shape, 1)
    assert torch.equal(
        vlm.adapter.lm_attention_mask(batch.inputs, embeds, batch.position_ids), expected["attention_mask"]
    )

    ids, real = batch.input_ids, batch.attention_mask.bool()
    assert torch.equal(batch.image_mask, (ids == vlm.adapter.image_token_id) & real)
    assert not (batch.image_mask & batch.text_mask).any()
    assert torch.equal(batch.special_mask, ~(batch.image_mask | batch.text_mask))
    structure = vlm.adapter.image_text_mask(ids) & real & ~batch.image_mask
    assert batch.special_mask[structure].all()
    if "mm_token_type_ids" in expected:
        assert torch.equal(batch.image_mask, expected["mm_token_type_ids"] == 1)
        for token in (config.vision_start_token_id, config.vision_end_token_id):
            assert ((ids == token).sum(-1) == 1).all()
            assert batch.special_mask[ids == token].all()
    if loaded.name == "smolvlm":
        tokenizer = vlm.tokenizer
        markers = ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_1_col_4>"]
        for token in tokenizer.convert_tokens_to_ids(markers):
            assert (ids == token).any() and batch.special_mask[ids == token].all()
        assert int(structure.sum()) > 0


# ---------------------------------------------------------------- logits
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_hf_on_a_padded_batch(loaded, padding_side):
    """Logits of the HookedVLM loaded from the folder equal the HF model's loaded from it (eager,
    float32), on every real position of a padded batch of two with different images, padded on
    either side (right padding: the shorter item's positions end before the longer's, M-RoPE
    positions are derived past the padding)."""
    batch = loaded.prepare(loaded.checkpoint.batch_sizes, QUESTIONS, padding_side)
    real = batch.attention_mask.bool()
    padded_column = 0 if padding_side == "left" else -1
    assert not real[:, padded_column].all(), f"the batch must be {padding_side}-padded"
    ours = loaded.vlm(batch)
    expected = hf_logits(loaded, batch)
    assert ours.shape == expected.shape
    diff = (ours - expected)[real].abs().max().item()
    where = f"{loaded.name} ({padding_side})"
    print(f"{where}: max |logit diff| {diff:.2e} over {int(real.sum())} real positions")
    assert diff <= TOL
    assert expected[real].std() > 0.1  # the logits are not flat: the comparison means something


# ---------------------------------------------------------------- weights
def kept(name: str, config: transformers.PretrainedConfig) -> bool:
    """Whether a tensor of the real checkpoint belongs to the cut-down model (its layer kept)."""
    match = re.search(r"\.(?:layers|blocks)\.(\d+)\.", name)
    if match is None:
        return True
    if "vision" in name or "visual" in name:
        vision = config.vision_config
        depth = getattr(vision, "depth", None) or vision.num_hidden_layers  # Qwen's towers say depth
    else:
        depth = config.get_text_config().num_hidden_layers
    return int(match.group(1)) < depth


def test_loading_puts_each_tensor_where_it_was_built(loaded):
    """Every parameter of the HF model loaded from the folder is the one built (64 values of each)."""
    for name, param in loaded.reference.named_parameters():
        assert torch.equal(sample(param), loaded.fingerprints[name]), name


@pytest.mark.parametrize("loaded", WITH_INDEX, indirect=True)
def test_saved_tensors_are_named_as_the_real_checkpoint(loaded):
    """The folder's tensors carry the real checkpoint's names: exactly the names of its weight index,
    less the layers removed. HookedVLM loaded them (it refuses a missing or unexpected tensor) and
    the test above found each where it was built."""
    index = json.loads((REAL / loaded.checkpoint.folder / INDEX).read_text())["weight_map"]
    with safe_open(loaded.directory / "model.safetensors", "pt") as saved:
        names = set(saved.keys())
    expected = {name for name in index if kept(name, loaded.config)}
    assert names == expected, (sorted(names - expected)[:5], sorted(expected - names)[:5])
    assert len(names) < len(index)  # layers were removed, none added


# ---------------------------------------------------------------- the CLI
@pytest.mark.parametrize("loaded", ["smolvlm"], indirect=True)
def test_cli_phase_diagram_runs_on_the_folder(loaded, tmp_path, monkeypatch):
    """``hooked-vllm phase-diagram --model <folder>`` on two images (COCO's layout), in this process,
    on the smallest checkpoint (SmolVLM: 0.4 GB; the images are the batch's, 5 tiles each). The CLI
    loads with ``HookedVLM.from_pretrained``, tested above on every checkpoint; the report's explorer
    (a forward and a generation more) and the per-image-token lens are left out for time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_coco(tmp_path / "coco", n_images=2)
    for seed, path in enumerate(sorted((data / "val2014").iterdir())):
        image(loaded.checkpoint.batch_sizes[seed], seed).save(path)
    out = tmp_path / "out"
    args = ["--model", str(loaded.directory), "--dataset", "coco", "--data-dir", str(data), "--n", "2"]
    args += ["--batch-size", "2", "--device", "cpu", "--report-items", "0", "--no-verbalize-images"]
    assert cli_main(["phase-diagram", *args, "--no-progress", "--out", str(out)]) == 0
    aggregates = json.loads((out / "aggregates.json").read_text())
    assert aggregates["n_items"] == 2
    assert len(aggregates["contextualization"]["inter"]["mean"]) == loaded.checkpoint.text_layers + 1
    assert (out / "report.html").stat().st_size > 0
