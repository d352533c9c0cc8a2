"""A tiny LLaVA-1.5 built in-process."""

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from hooked_vllm.tiny_models.common import (
    IMAGE_TOKEN,
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    train_tokenizer,
)


def tiny_llava(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    image_size: int = 30,
    patch_size: int = 6,
    vision_layers: int = 2,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    padding_side: str = "left",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random LLaVA-1.5-architecture model (CLIP tower, 2-layer MLP projector, LLaMA) and its processor.

    With the defaults: 25 image tokens (30px / patch 6, CLS dropped), 3 text layers with grouped-query
    attention (4 query heads, 2 key/value heads), eager attention, float32.
    """
    directory = Path(directory) if directory is not None else default_dir("llava")
    tokenizer = train_tokenizer(directory / "tokenizer", padding_side=padding_side)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            **{**TINY_VISION, "num_hidden_layers": vision_layers},
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        text_config=text.llama_config(len(tokenizer), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = finish_init(LlavaForConditionalGeneration(config), seed)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    return model, processor
