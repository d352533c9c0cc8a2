"""Builders of tiny in-process models for tests (they live in :mod:`hooked_vllm.tiny_models`, which the
package itself also uses: the demo trainer and the CLI's untrained fallback)."""

from hooked_vllm.tiny_models import (
    IMAGE_TOKEN,
    TinyTextConfig,
    tiny_gemma3,
    tiny_instructblip,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    train_tokenizer,
)

__all__ = [
    "IMAGE_TOKEN",
    "TinyTextConfig",
    "tiny_gemma3",
    "tiny_instructblip",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "train_tokenizer",
]
