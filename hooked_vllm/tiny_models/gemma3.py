"""A tiny Gemma 3 built in-process."""

from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from hooked_vllm.tiny_models.common import (
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    train_tokenizer,
)

_GEMMA3_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}


def tiny_gemma3(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(n_layers=4),
    padding_side: str = "left",
    sliding_window: int = 6,
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """A random Gemma-3-architecture model (SigLIP tower, pooled to 16 slots, Gemma 3 LM) and its processor.

    Text layers alternate sliding (window ``sliding_window``) and full attention, starting with sliding:
    S, F, S, F with the default 4 layers. The window of 6 is smaller than the 16-slot image block, so the
    bidirectional image mask and the window interact. ``<start_of_image>`` in a prompt expands to
    ``\\n\\n<start_of_image>``, 16 ``<image_soft_token>`` and ``<end_of_image>\\n\\n``; images go in as one
    list per item. The embedding and head are re-drawn with std 0.1 (the embedding is scaled by sqrt(d_model))
    and every all-zero parameter is re-drawn (``(1 + w)`` norms, ``mm_input_projection_weight``).
    Prompt: ``"<start_of_image>{text}"``.
    """
    directory = Path(directory) if directory is not None else default_dir("gemma3")
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        extra_special_tokens=(),
        named_special_tokens=_GEMMA3_TOKENS,
        padding_side=padding_side,
    )
    image_size, patch_size, mm_tokens_per_image = 32, 4, 16
    torch.manual_seed(seed)
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        head_dim=text.head_dim,
        query_pre_attn_scalar=text.head_dim,
        sliding_window=sliding_window,
        layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(text.n_layers)],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **text._sizes(),
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=SiglipVisionConfig(
            **TINY_VISION,
            image_size=image_size,
            patch_size=patch_size,
        ),
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids(_GEMMA3_TOKENS["boi_token"]),
        eoi_token_index=tokenizer.convert_tokens_to_ids(_GEMMA3_TOKENS["eoi_token"]),
        image_token_index=tokenizer.convert_tokens_to_ids(_GEMMA3_TOKENS["image_token"]),
        tie_word_embeddings=False,
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = finish_init(Gemma3ForConditionalGeneration(config), seed, embed_std=0.1, redraw_zeros=True)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        image_seq_length=mm_tokens_per_image,
    )
    return model, processor
