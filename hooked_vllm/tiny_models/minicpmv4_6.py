"""A tiny MiniCPM-V 4.6 (NaViT-style ViT with a 2x2 window-attention merger, 2x2 merge + MLP per
slice, hybrid Qwen3.5 language model) built in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    MiniCPMV4_6Config,
    MiniCPMV4_6ForConditionalGeneration,
    MiniCPMV4_6ImageProcessor,
    MiniCPMV4_6Processor,
    MiniCPMV4_6VideoProcessor,
    MiniCPMV4_6VisionConfig,
    Qwen3_5TextConfig,
)

from hooked_vllm.tiny_models.common import TinyTextConfig, default_dir, finish_init, train_tokenizer
from hooked_vllm.tiny_models.qwen3_5 import qwen3_5_text_kwargs

#: the tokens MiniCPM-V 4.6's processor reads from its tokenizer (attribute -> token)
MINICPM_TOKENS = {
    "image_token": "<unk_image>",
    "video_token": "<unk_video>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
#: patch 4; slices of at most 32x32 px (``scale_resolution``), sides rounded to 16 px (the 4x merge)
MINICPM_PATCH, MINICPM_SCALE = 4, 32


def tiny_minicpmv4_6(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[MiniCPMV4_6ForConditionalGeneration, MiniCPMV4_6Processor]:
    """A random MiniCPM-V 4.6-architecture model and its processor.

    Vision: a 3-block ViT (patch 4, learned positions on an 8x8 grid, bucketed per slice), the 2x2
    window-attention merger after block 1 (``insert_layer_id``), then a 2x2 merge + MLP into the text
    model: each ``<unk_image>`` slot covers 16x16 pixels. The image processor gives each image a
    source view (resized to at most 32x32 px, sides rounded to 16) and, when larger than 32x32 px, a
    grid of up to 4 slices: the test images 48x24, 24x48 and 40x40 (w x h) get views of 3, 3 and 4
    slots and slice grids 1x2, 2x1 and 2x1 (rows x cols) with slices of 4, 4 and 3 slots (11, 11
    and 10 in all). Text: Qwen3.5's tiny hybrid model (:mod:`hooked_vllm.tiny_models.qwen3_5`). No
    BOS; all-zero parameters re-drawn, the patch embedding widened (else the image barely reaches the
    logits). The processor prepends ``<image_id>N</image_id>`` to each image (HF's default
    ``use_image_id``).
    """
    directory = Path(directory) if directory is not None else default_dir("minicpmv4_6")
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        add_bos=False,
        extra_special_tokens=(),
        named_special_tokens=MINICPM_TOKENS,
        padding_side=padding_side,
    )
    torch.manual_seed(seed)
    vision = MiniCPMV4_6VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=MINICPM_PATCH,
    )
    config = MiniCPMV4_6Config(
        vision_config=vision,
        text_config=Qwen3_5TextConfig(**qwen3_5_text_kwargs(text, tokenizer)),
        insert_layer_id=1,
        image_size=MINICPM_SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids(MINICPM_TOKENS["image_token"]),
        video_token_id=tokenizer.convert_tokens_to_ids(MINICPM_TOKENS["video_token"]),
        tie_word_embeddings=False,
    )
    config.architectures = [MiniCPMV4_6ForConditionalGeneration.__name__]
    config._attn_implementation = "eager"
    # at HF's init (patch embedding std 0.02) two noise images gave prefixes 0.036 apart (relative) and
    # last-position logits 1.3e-3; widened (std 0.5): 0.36 and 8.4e-3
    model = finish_init(
        MiniCPMV4_6ForConditionalGeneration(config),
        seed,
        redraw_zeros=True,
        widen=("patch_embedding.weight",),
    )
    sizes = {"max_slice_nums": 4, "scale_resolution": MINICPM_SCALE, "patch_size": MINICPM_PATCH}
    processor = MiniCPMV4_6Processor(
        image_processor=MiniCPMV4_6ImageProcessor(**sizes),
        video_processor=MiniCPMV4_6VideoProcessor(**sizes),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(directory / "processor")
    return model, MiniCPMV4_6Processor.from_pretrained(directory / "processor")
