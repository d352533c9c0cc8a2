"""A tiny Mistral 3 (``Mistral3ForConditionalGeneration``: Pixtral tower, patch merger, Ministral 3 or
Mistral language model) built in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Ministral3Config,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
)

from hooked_vllm.tiny_models.common import (
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    train_tokenizer,
)

IMAGE_TOKEN, BREAK_TOKEN, END_TOKEN = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
#: the instruction markers of Mistral's chat format
CHAT_TOKENS = ("[INST]", "[/INST]")
#: Ministral 3's llama-4 query scale, with the scale's period cut to 16 positions so that it changes
#: inside a tiny prompt (real checkpoints: 16384)
LLAMA_4_PERIOD = 16


def tiny_mistral3(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
    text_model: str = "ministral3",
) -> tuple[Mistral3ForConditionalGeneration, PixtralProcessor]:
    """A random Mistral 3-architecture model and its processor.

    Pixtral tower (2-D RoPE over each image's own patch grid, patch 4) -> RMSNorm -> patch merger
    (2x2 patches to one) -> 2-layer MLP projector. Images are resized to a longest edge of 48px in
    whole 8px cells, so the test images 48x24, 24x48 and 40x40 (w x h) give 3x6, 6x3 and 5x5 ``[IMG]``
    slots; the processor ends each row of slots with ``[IMG_BREAK]`` and the last with ``[IMG_END]``.

    ``text_model="ministral3"`` (default): Ministral 3's text model, YaRN RoPE and the llama-4 query
    scale ``1 + 0.1 log(1 + floor(pos / 16))`` (real: a period of 16384 positions); ``"mistral"``:
    Mistral Small 3.1's plain Mistral text model. All-zero parameters re-drawn.
    Prompt: ``"[INST][IMG]{text}[/INST]"`` (BOS ``<s>`` added by the tokenizer).
    """
    directory = Path(directory) if directory is not None else default_dir("mistral3")
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        extra_special_tokens=(IMAGE_TOKEN, BREAK_TOKEN, END_TOKEN, *CHAT_TOKENS),
        padding_side=padding_side,
    )
    patch_size, merge = 4, 2
    torch.manual_seed(seed)
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(
            **TINY_VISION,
            head_dim=TINY_VISION["hidden_size"] // TINY_VISION["num_attention_heads"],
            image_size=48,
            patch_size=patch_size,
        ),
        text_config=_text_config(text_model, text, tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        spatial_merge_size=merge,
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
    )
    config.architectures = ["Mistral3ForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = finish_init(Mistral3ForConditionalGeneration(config), seed, redraw_zeros=True)
    image_processor = PixtralImageProcessor(
        size={"longest_edge": 48}, patch_size={"height": patch_size, "width": patch_size}
    )
    processor = PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        spatial_merge_size=merge,
    )
    return model, processor


def _text_config(kind: str, text: TinyTextConfig, tokenizer) -> Ministral3Config | MistralConfig:
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
        head_dim=text.head_dim,
        **text._sizes(),
    )
    if kind == "mistral":
        return MistralConfig(**ids, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if kind != "ministral3":
        raise ValueError(f"text_model must be 'ministral3' or 'mistral', not {kind!r}.")
    rope = {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": text.n_ctx / LLAMA_4_PERIOD,
        "original_max_position_embeddings": LLAMA_4_PERIOD,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    }
    return Ministral3Config(**ids, rope_parameters=rope)
