"""Builders of tiny in-process models for tests, benchmarks and the offline demo."""

from hooked_vllm.testing.tiny_models import (
    IMAGE_TOKEN,
    TinyTextConfig,
    tiny_instructblip,
    tiny_llava,
    train_tokenizer,
)

__all__ = ["IMAGE_TOKEN", "TinyTextConfig", "tiny_instructblip", "tiny_llava", "train_tokenizer"]
