"""A tiny Qwen3-VL (DeepStack) built in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLTextConfig,
    Qwen3VLVideoProcessor,
    Qwen3VLVisionConfig,
)

from hooked_vllm.tiny_models import (
    _QWEN_TOKENS,
    TinyTextConfig,
    _default_dir,
    _finish,
    _qwen_text_kwargs,
    train_tokenizer,
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
    directory = Path(directory) if directory is not None else _default_dir("qwen3-vl")
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        add_bos=False,
        extra_special_tokens=tuple(_QWEN_TOKENS.values()),
        padding_side=padding_side,
    )
    token_ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in _QWEN_TOKENS.items()}
    patch_size, merge_size, temporal_patch_size = 4, 2, 2
    torch.manual_seed(seed)
    text_kwargs = _qwen_text_kwargs(text, tokenizer)
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
    model = _finish(Qwen3VLForConditionalGeneration(config), seed, redraw_zeros=True)
    factor = patch_size * merge_size
    sizes = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (8 * factor) ** 2}, **sizes
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**sizes),
    )
    return model, processor
