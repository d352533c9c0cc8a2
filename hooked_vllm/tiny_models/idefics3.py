"""Tiny Idefics3 and SmolVLM models (:func:`tiny_idefics3`, :func:`tiny_smolvlm`): SigLIP-style tower on
image tiles, pixel shuffle + linear connector, LLaMA language model.

Both split an image into square tiles of ``max_image_size`` pixels (after resizing its longest edge to
``size["longest_edge"]`` and rounding both sides up to whole tiles), plus the whole image resized to one
tile (the "global image"), and pixel-shuffle each tile's ``side x side`` patch grid into
``side/s x side/s`` slots (``s = scale_factor``). The processor writes, per tile,
``<fake_token_around_image><row_i_col_j>`` + the tile's ``<image>`` slots, a newline after each row of
tiles, then ``\\n<fake_token_around_image><global-img>`` + the global image's slots +
``<fake_token_around_image>`` (an image of one tile only gets the global block).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
    SmolVLMVisionConfig,
)

import hooked_vllm.adapters.idefics3  # noqa: F401 (SmolVLM's processor without num2words: see there)
from hooked_vllm.tiny_models.common import (
    IMAGE_TOKEN,
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    train_tokenizer,
)

FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
#: the tile markers the processors write (they look up rows and columns 1..6)
ROW_COL_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))


def _tiny_tiled(
    kind: str,
    seed: int,
    directory: str | Path | None,
    text: TinyTextConfig,
    padding_side: str,
    *,
    smolvlm: bool,
    tile: int,
    longest_edge: int,
    patch_size: int,
    scale_factor: int,
):
    directory = Path(directory) if directory is not None else default_dir(kind)
    if smolvlm:
        # SmolVLM's tokenizer names its image tokens (its processor reads them from the tokenizer);
        # SmolLM2 adds no BOS.
        named = {
            "image_token": IMAGE_TOKEN,
            "fake_image_token": FAKE_TOKEN,
            "global_image_token": GLOBAL_TOKEN,
            "end_of_utterance_token": END_OF_UTTERANCE,
            "video_token": "<video>",
        }
        tokenizer = train_tokenizer(
            directory / "tokenizer",
            add_bos=False,
            extra_special_tokens=ROW_COL_TOKENS,
            named_special_tokens=named,
            padding_side=padding_side,
        )
    else:
        tokenizer = train_tokenizer(
            directory / "tokenizer",
            extra_special_tokens=(IMAGE_TOKEN, FAKE_TOKEN, GLOBAL_TOKEN, END_OF_UTTERANCE, *ROW_COL_TOKENS),
            padding_side=padding_side,
        )
    torch.manual_seed(seed)
    vision_class, config_class, model_class = (
        (SmolVLMVisionConfig, SmolVLMConfig, SmolVLMForConditionalGeneration)
        if smolvlm
        else (Idefics3VisionConfig, Idefics3Config, Idefics3ForConditionalGeneration)
    )
    config = config_class(
        vision_config=vision_class(
            **TINY_VISION,
            image_size=tile,
            patch_size=patch_size,
        ).to_dict(),
        text_config=text.llama_config(len(tokenizer), tokenizer).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = [model_class.__name__]
    config._attn_implementation = "eager"
    model = finish_init(model_class(config), seed, redraw_zeros=True)
    image_seq_len = (tile // patch_size) ** 2 // scale_factor**2
    image_processor_class = SmolVLMImageProcessor if smolvlm else Idefics3ImageProcessor
    image_processor = image_processor_class(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}
    )
    if smolvlm:
        processor = SmolVLMProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=SmolVLMVideoProcessor(
                size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}
            ),
            image_seq_len=image_seq_len,
        )
    else:
        processor = Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len
        )
    return model, processor


def tiny_idefics3(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """A random Idefics3-architecture model (SigLIP-style tower, pixel shuffle 2, LLaMA) and its processor.

    Tiles of 24px, patch 4: a 6x6 patch grid per tile, shuffled into 3x3 = 9 ``<image>`` slots. Images
    are resized to a longest edge of 48px, so the test images 48x24, 24x48 and 40x40 (w x h) split into
    1x2, 2x1 and 2x2 tiles (rows x cols) plus the global image: 27, 27 and 45 image slots. BOS ``<s>``;
    all-zero parameters re-drawn. Prompt: ``"User:<image>{text}<end_of_utterance>\\nAssistant:"``.
    """
    return _tiny_tiled(
        "idefics3", seed, directory, text, padding_side,
        smolvlm=False, tile=24, longest_edge=48, patch_size=4, scale_factor=2,
    )  # fmt: skip


def tiny_smolvlm(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[SmolVLMForConditionalGeneration, SmolVLMProcessor]:
    """A random SmolVLM-architecture model (SigLIP-style tower, pixel shuffle 3, LLaMA) and its processor.

    Tiles of 24px, patch 4: a 6x6 patch grid per tile, shuffled into 2x2 = 4 ``<image>`` slots. Images are
    resized to a longest edge of 72px, so the test images 48x24, 24x48 and 40x40 (w x h) split into 2x3,
    3x2 and 3x3 tiles (rows x cols) plus the global image: 28, 28 and 40 image slots. No BOS (SmolLM2's
    tokenizer adds none); all-zero parameters re-drawn.
    Prompt: ``"User:<image>{text}<end_of_utterance>\\nAssistant:"``.
    """
    return _tiny_tiled(
        "smolvlm", seed, directory, text, padding_side,
        smolvlm=True, tile=24, longest_edge=72, patch_size=4, scale_factor=3,
    )  # fmt: skip
