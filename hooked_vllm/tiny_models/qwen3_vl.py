"""A tiny Qwen3-VL (DeepStack) built in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLTextConfig,
    Qwen3VLVideoProcessor,
    Qwen3VLVisionConfig,
)

from hooked_vllm.tiny_models.common import TinyTextConfig, default_dir, finish_init
from hooked_vllm.tiny_models.qwen2_vl import (
    QWEN_MERGE,
    QWEN_PATCH,
    QWEN_TEMPORAL,
    qwen_processor,
    qwen_text_kwargs,
    qwen_tokenizer,
)


def tiny_qwen3_vl(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLProcessor]:
    """A random Qwen3-VL-architecture model (3-block ViT with learned position embeddings, 2x2 merge,
    DeepStack features of vision blocks 0 and 1 added after text layers 0 and 1; a Qwen3 LM with q/k
    norms and interleaved M-RoPE) and its processor.

    Patch 4 and merge 2, as :func:`~hooked_vllm.tiny_models.tiny_qwen2_vl`: each ``<|image_pad|>``
    slot covers 8x8 pixels. No BOS. All-zero parameters are re-drawn.
    Prompt: ``"<|vision_start|><|image_pad|><|vision_end|>{text}"``.
    """
    directory = Path(directory) if directory is not None else default_dir("qwen3-vl")
    tokenizer, token_ids = qwen_tokenizer(directory, padding_side)
    patch_size, merge_size, temporal_patch_size = QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL
    torch.manual_seed(seed)
    text_kwargs = qwen_text_kwargs(text, tokenizer)
    text_kwargs["rope_parameters"]["mrope_interleaved"] = True
    vision = Qwen3VLVisionConfig(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        out_hidden_size=text.d_model,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    )
    config = Qwen3VLConfig(
        vision_config=vision,
        text_config=Qwen3VLTextConfig(head_dim=text.head_dim, **text_kwargs),
        tie_word_embeddings=False,
        **token_ids,
    )
    config.architectures = [Qwen3VLForConditionalGeneration.__name__]
    config._attn_implementation = "eager"
    model = finish_init(Qwen3VLForConditionalGeneration(config), seed, redraw_zeros=True)
    return model, qwen_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tokenizer)
