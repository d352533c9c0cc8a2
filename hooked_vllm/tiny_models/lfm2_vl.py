"""A tiny LFM2-VL (SigLIP2 NaFlex tower on tiles + thumbnail, pixel-unshuffle projector, LFM2 hybrid
language model: gated short convolutions between attention layers) built in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Lfm2Config,
    Lfm2VlConfig,
    Lfm2VlForConditionalGeneration,
    Lfm2VlImageProcessor,
    Lfm2VlProcessor,
    Siglip2VisionConfig,
)

from hooked_vllm.tiny_models.common import (
    IMAGE_TOKEN,
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    train_tokenizer,
)

IMAGE_START, IMAGE_END, THUMBNAIL = "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"
#: the tile markers the processor writes (rows and columns up to the tiny processor's 4 tiles)
ROW_COL_TOKENS = tuple(f"<|img_row_{r}_col_{c}|>" for r in range(1, 5) for c in range(1, 5))
#: short convolution, attention, twice: patterns at layers 1 and 3 only (the real models: 10 conv
#: and 6 attention layers of 16)
LFM2_LAYER_TYPES = ["conv", "full_attention"] * 2


def tiny_lfm2_vl(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Lfm2VlForConditionalGeneration, Lfm2VlProcessor]:
    """A random LFM2-VL-architecture model and its processor.

    Text: LFM2 with 4 layers, gated short convolutions (kernel 3, ``conv_L_cache``) at layers 0 and 2
    (no attention pattern), grouped-query attention with q/k norms at 1 and 3; the head untied from
    the embedding (the real models tie them; tied, this random model's greedy decoding repeats its
    last token). Vision: a 2-layer SigLIP2 (NaFlex) tower, patch 4, pixel
    unshuffle 2 (each ``<image>`` slot covers 8x8 pixels). The image processor keeps an image of at
    most 24 slots whole (48x24 and 24x48: one tile of 3x6 or 6x3 slots) and tiles a larger one into
    24px tiles plus a thumbnail (40x40: 2x2 tiles of 3x3 slots, then a 4x4 thumbnail: 52 slots), each
    tile after its ``<|img_row_i_col_j|>`` marker, the thumbnail after ``<|img_thumbnail|>``, the whole
    image between ``<|image_start|>`` and ``<|image_end|>``. No BOS from the tokenizer (the real
    chat template writes it; the processor adds no special tokens); ``text``'s ``n_layers`` is
    not used (the layer pattern is fixed). All-zero parameters are re-drawn.
    """
    directory = Path(directory) if directory is not None else default_dir("lfm2-vl")
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        add_bos=False,  # the processor adds no special tokens: the real chat template writes BOS
        extra_special_tokens=(IMAGE_TOKEN, IMAGE_START, IMAGE_END, THUMBNAIL, *ROW_COL_TOKENS),
        padding_side=padding_side,
    )
    torch.manual_seed(seed)
    text_config = Lfm2Config(
        vocab_size=len(tokenizer),
        hidden_size=text.d_model,
        intermediate_size=text.d_mlp,
        block_auto_adjust_ff_dim=False,
        num_hidden_layers=len(LFM2_LAYER_TYPES),
        layer_types=list(LFM2_LAYER_TYPES),
        num_attention_heads=text.n_heads,
        num_key_value_heads=text.n_kv_heads,
        max_position_embeddings=text.n_ctx,
        conv_L_cache=3,
        conv_bias=False,  # as the real models (a bias would leak HF's zeroed padding: see the adapter)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = Lfm2VlConfig(
        vision_config=Siglip2VisionConfig(
            **TINY_VISION, patch_size=4, num_patches=64, vision_use_head=False
        ).to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_size=64,
        downsample_factor=2,
        tie_word_embeddings=False,
    )
    config.architectures = [Lfm2VlForConditionalGeneration.__name__]
    config._attn_implementation = "eager"
    model = finish_init(Lfm2VlForConditionalGeneration(config), seed, redraw_zeros=True)
    image_processor = Lfm2VlImageProcessor(
        encoder_patch_size=4,
        downsample_factor=2,
        tile_size=24,
        min_image_tokens=4,
        max_image_tokens=24,
        max_tiles=4,
        max_pixels_tolerance=1.0,
    )
    processor = Lfm2VlProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(directory / "processor")
    return model, Lfm2VlProcessor.from_pretrained(directory / "processor")
