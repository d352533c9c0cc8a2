"""A tiny Llama 4 (``Llama4ForConditionalGeneration``): a ViT on tiles plus a global view, pixel
shuffle and an MLP adapter, a linear projector, and a text model that interleaves chunked-attention
RoPE layers with full-attention NoPE layers and dense MLPs with mixtures of experts (sigmoid top-k
router, batched experts, a shared expert)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Llama4Config,
    Llama4ForConditionalGeneration,
    Llama4ImageProcessor,
    Llama4Processor,
    Llama4TextConfig,
    Llama4VisionConfig,
)

from hooked_vllm.tiny_models.common import TinyTextConfig, default_dir, finish_init, train_tokenizer

#: the special tokens of Llama 4's tokenizer that its processor and chat template write
LLAMA4_TOKENS = (
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
    "<|image|>",
    "<|patch|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)


def tiny_llama4(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(n_layers=4),
    padding_side: str = "left",
    tile_size: int = 16,
    patch_size: int = 2,
    max_patches: int = 4,
    attention_chunk_size: int = 24,
    floor_scale: int = 8192,
) -> tuple[Llama4ForConditionalGeneration, Llama4Processor]:
    """A random Llama 4-architecture model and its processor.

    Text: ``text.n_layers`` (4) layers; RoPE on even layers, which use chunked attention (chunks of
    ``attention_chunk_size`` = 24 positions, fewer than any test prompt has) with the weightless L2
    q/k norm; NoPE on odd layers, which attend to everything before them (Llama 4's
    ``no_rope_layers``; the real models have one NoPE layer in four). Layers 1 and 2 are mixtures
    of 4 experts (top 2, 32 units each, a shared expert of 32); layers 0 and 3 dense MLPs of
    ``text.d_mlp`` units (Maverick interleaves them the same way; Scout is all MoE).

    Vision: tiles of 16x16 pixels, patch 2 (an 8x8 grid, a CLS token appended then dropped), pixel
    shuffle 0.5 to a 4x4 grid: 16 ``<|patch|>`` slots per tile. The image processor fits each image
    on a canvas of at most ``max_patches`` (4) tiles; with more than one tile a global view (the
    whole image resized to one tile) follows the crops. The test images get 48x24 -> 1x2 tiles +
    global, 24x48 -> 2x1 + global, 40x40 -> 2x2 + global. Temperature tuning of the NoPE layers is
    on with the real ``floor_scale`` (8192: a scale of 1 below 8191 slots; a small one exercises it).

    The tokenizer adds BOS; the processor has Llama 4's chat template (its class default).
    """
    directory = Path(directory) if directory is not None else default_dir("llama4")
    tokenizer = train_tokenizer(
        directory / "tokenizer", extra_special_tokens=LLAMA4_TOKENS, padding_side=padding_side
    )
    pixel_shuffle_ratio = 0.5
    vision_hidden = 32
    torch.manual_seed(seed)
    config = Llama4Config(
        vision_config=Llama4VisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=int(vision_hidden / pixel_shuffle_ratio**2),  # the adapter's input width
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=tile_size,
            patch_size=patch_size,
            pixel_shuffle_ratio=pixel_shuffle_ratio,
            projector_input_dim=64,
            projector_output_dim=64,
            vision_output_dim=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        text_config=Llama4TextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text.d_model,
            intermediate_size=32,
            intermediate_size_mlp=text.d_mlp,
            num_hidden_layers=text.n_layers,
            num_attention_heads=text.n_heads,
            num_key_value_heads=text.n_kv_heads,
            head_dim=text.head_dim,
            max_position_embeddings=text.n_ctx,
            num_local_experts=4,
            num_experts_per_tok=2,
            moe_layers=[1, 2],
            no_rope_layers=[int(layer % 2 == 0) for layer in range(text.n_layers)],
            attention_chunk_size=attention_chunk_size,
            floor_scale=floor_scale,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<|patch|>"),
        boi_token_index=tokenizer.convert_tokens_to_ids("<|image_start|>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<|image_end|>"),
        tie_word_embeddings=False,
    )
    config.architectures = ["Llama4ForConditionalGeneration"]
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = finish_init(Llama4ForConditionalGeneration(config), seed, redraw_zeros=True)
    processor = Llama4Processor(
        image_processor=Llama4ImageProcessor(
            size={"height": tile_size, "width": tile_size}, max_patches=max_patches
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        pixel_shuffle_ratio=pixel_shuffle_ratio,
    )
    return model, processor
