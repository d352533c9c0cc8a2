"""The tiny LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, AnyRes tiles with
the ``anyres_max`` downscale, MLP projector, Qwen2 language model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    SiglipVisionConfig,
)

from hooked_vllm.tiny_models.common import (
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    train_tokenizer,
)

#: the special tokens of a LLaVA-OneVision (Qwen2) tokenizer that its prompts use
_ONEVISION_TOKENS = ("<image>", "<video>", "<|im_start|>", "<|im_end|>")

#: LLaVA-OneVision's chat template, as the ``llava-hf`` OneVision checkpoints ship it
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_llava_onevision(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
    vision_aspect_ratio: str = "anyres_max_2",
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A random LLaVA-OneVision-architecture model (SigLIP tower, AnyRes tiles with the ``anyres_max``
    downscale, 2-layer MLP projector, Qwen2 LM) and its processor.

    Geometry. Tiles are 24px with patch 6: 4x4 = 16 slots per tile (SigLIP has no CLS token:
    ``vision_feature_select_strategy="full"``). The grid pinpoints (height x width) are 24x48, 72x24 and
    48x48: an image alone in its prompt gets one base tile (the whole image, resized) plus a 1x2, 3x1 or
    2x2 high-resolution canvas of 4x8, 12x4 or 8x8 patches, unpadded to the image's aspect. With
    ``vision_aspect_ratio="anyres_max_2"``, an unpadded ``rows x cols`` canvas whose
    ``ratio = sqrt(rows * cols / (2 * 16))`` exceeds 1.1 is bilinearly downscaled to
    ``int(rows // ratio) x int(cols // ratio)``; then one ``image_newline`` slot is appended to each
    canvas row. The test images (w x h) fill:

    - 48x24: 1x2 tiles, canvas 4x8 (kept): 16 base + 32 + 4 newlines = 52 slots, 48 patches;
    - 24x48: 3x1 tiles, canvas 12x4 unpadded to 8x4 (kept): 16 + 32 + 8 newlines = 56 slots, 48 patches;
    - 40x40: 2x2 tiles, canvas 8x8 downscaled to 5x5 (ratio 1.41): 16 + 25 + 5 newlines = 46 slots,
      41 patch slots.

    A prompt with several images (``batch_num_images`` > 1) gets no tiles: each image is its base tile
    (padded to a square) plus one ``image_newline`` slot, 17 slots.

    Text: a Qwen2 decoder (q/k/v biases), 3 layers, d_model 64, 4 query heads and 2 key/value heads, no
    BOS. The embedding, head and ``image_newline`` are re-drawn wide, every all-zero parameter (biases)
    re-drawn. The processor carries OneVision's chat template: ``"<|im_start|>user\\n<image>\\n{text}
    <|im_end|>\\n<|im_start|>assistant\\n"``.
    """
    directory = Path(directory) if directory is not None else default_dir("llava-onevision")
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        add_bos=False,
        extra_special_tokens=_ONEVISION_TOKENS,
        padding_side=padding_side,
    )
    image_size, patch_size = 24, 6
    pinpoints = [[image_size, 2 * image_size], [3 * image_size, image_size], [2 * image_size, 2 * image_size]]
    torch.manual_seed(seed)
    text_config = text.qwen2_config(tokenizer)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            **TINY_VISION,
            image_size=image_size,
            patch_size=patch_size,
            vision_use_head=False,
        ),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = finish_init(
        LlavaOnevisionForConditionalGeneration(config), seed, widen=("image_newline",), redraw_zeros=True
    )
    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )
    return model, processor
