"""Tiny Qwen2-VL and Qwen2.5-VL built in-process, and the Qwen-VL tokenizer and processor the
Qwen3-VL builder shares."""

from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLTextConfig,
    Qwen2VLVideoProcessor,
    Qwen2VLVisionConfig,
)

from hooked_vllm.tiny_models.common import TinyTextConfig, default_dir, finish_init, train_tokenizer

_QWEN_TOKENS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}


def qwen_text_kwargs(text: TinyTextConfig, tokenizer: PreTrainedTokenizerFast) -> dict:
    # M-RoPE splits the head's rotary half into (temporal, height, width) sections, 1/4 : 3/8 : 3/8 like Qwen.
    half = text.head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [temporal, height, half - temporal - height],
        },
        **text._sizes(),
    )


#: The tiny Qwen-VLs' geometry: patch 4, 2x2 merge, 2 frames per temporal patch (a slot is 8x8 px)
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2


def qwen_tokenizer(directory: Path, padding_side: str) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """A tokenizer with Qwen's vision tokens (no BOS) and the config keywords naming their ids."""
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        add_bos=False,
        extra_special_tokens=tuple(_QWEN_TOKENS.values()),
        padding_side=padding_side,
    )
    return tokenizer, {key: tokenizer.convert_tokens_to_ids(token) for key, token in _QWEN_TOKENS.items()}


def qwen_processor(processor_class: type, video_processor_class: type, tokenizer: Any) -> Any:
    """A Qwen-VL processor of the tiny geometry; images between 2x2 and 8x8 merged slots."""
    factor = QWEN_PATCH * QWEN_MERGE
    sizes = dict(patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)
    return processor_class(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (8 * factor) ** 2}, **sizes
        ),
        tokenizer=tokenizer,
        video_processor=video_processor_class(**sizes),
    )


def _tiny_qwen(kind, seed, directory, text, padding_side, *, v2_5):
    directory = Path(directory) if directory is not None else default_dir(kind)
    tokenizer, token_ids = qwen_tokenizer(directory, padding_side)
    patch_size, merge_size, temporal_patch_size = QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL
    torch.manual_seed(seed)
    if v2_5:
        vision = Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=patch_size,
            spatial_merge_size=merge_size,
            temporal_patch_size=temporal_patch_size,
            window_size=16,
            out_hidden_size=text.d_model,
            fullatt_block_indexes=[1],
        )
        config = Qwen2_5_VLConfig(
            vision_config=vision,
            text_config=Qwen2_5_VLTextConfig(**qwen_text_kwargs(text, tokenizer)),
            tie_word_embeddings=False,
            **token_ids,
        )
        model_class, processor_class = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    else:
        vision = Qwen2VLVisionConfig(
            depth=2,
            embed_dim=32,
            hidden_size=text.d_model,
            num_heads=4,
            mlp_ratio=2,
            patch_size=patch_size,
            spatial_merge_size=merge_size,
            temporal_patch_size=temporal_patch_size,
        )
        config = Qwen2VLConfig(
            vision_config=vision,
            text_config=Qwen2VLTextConfig(**qwen_text_kwargs(text, tokenizer)),
            tie_word_embeddings=False,
            **token_ids,
        )
        model_class, processor_class = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    config.architectures = [model_class.__name__]
    config._attn_implementation = "eager"
    model = finish_init(model_class(config), seed, redraw_zeros=True)
    return model, qwen_processor(processor_class, Qwen2VLVideoProcessor, tokenizer)


def tiny_qwen2_vl(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """A random Qwen2-VL-architecture model (native-resolution ViT with 2x2 patch merging, M-RoPE Qwen2 LM).

    Patch 4 and merge 2: each ``<|image_pad|>`` slot covers 8x8 pixels, images are resized to multiples
    of 8 between 16x16 and 64x64 pixels' area. No BOS. All-zero parameters are re-drawn.
    Prompt: ``"<|vision_start|><|image_pad|><|vision_end|>{text}"``.
    """
    return _tiny_qwen("qwen2-vl", seed, directory, text, padding_side, v2_5=False)


def tiny_qwen2_5_vl(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A random Qwen2.5-VL-architecture model (windowed ViT with RMSNorm/SwiGLU, 2x2 merging, M-RoPE LM).

    As :func:`tiny_qwen2_vl`, with a 16px attention window in the first vision block and full attention
    in the second. Prompt: ``"<|vision_start|><|image_pad|><|vision_end|>{text}"``.
    """
    return _tiny_qwen("qwen2.5-vl", seed, directory, text, padding_side, v2_5=True)
