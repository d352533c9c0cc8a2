"""A tiny LLaVA-NeXT (anyres tiles) built in-process."""

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

from hooked_vllm.tiny_models.common import (
    IMAGE_TOKEN,
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    train_tokenizer,
)


def tiny_llava_next(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random LLaVA-NeXT-architecture model (CLIP tower, AnyRes tiles, MLP projector, LLaMA) + processor.

    Tiles are 24px with patch 6 (16 slots per tile, CLS dropped) and the grid pinpoints are 24x48,
    48x24 and 48x48, so an image gets one base tile plus a 1x2, 2x1 or 2x2 canvas, unpadded to the
    image's aspect, each canvas row followed by an ``image_newline`` slot. All-zero parameters and
    ``image_newline`` are re-drawn. Prompt: ``"USER: <image>\\n{text} ASSISTANT:"``.
    """
    directory = Path(directory) if directory is not None else default_dir("llava-next")
    tokenizer = train_tokenizer(directory / "tokenizer", padding_side=padding_side)
    image_size, patch_size = 24, 6
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            **TINY_VISION,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        text_config=text.llama_config(len(tokenizer), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = finish_init(
        LlavaNextForConditionalGeneration(config), seed, widen=("image_newline",), redraw_zeros=True
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor
