"""A tiny Qwen3.5-MoE (the hybrid Qwen3.5 text model with a sparse mixture-of-experts MLP) built
in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeTextConfig,
    Qwen3_5MoeVisionConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from hooked_vllm.tiny_models.common import TinyTextConfig, default_dir, finish_init
from hooked_vllm.tiny_models.qwen2_vl import qwen_processor, qwen_tokenizer
from hooked_vllm.tiny_models.qwen3_5 import qwen3_5_text_kwargs, qwen3_5_vision_config

#: routed experts per layer, and how many each token is sent to (real checkpoints: 256, top-8)
QWEN3_5_MOE_EXPERTS, QWEN3_5_MOE_TOP_K = 4, 2


def tiny_qwen3_5_moe(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Qwen3_5MoeForConditionalGeneration, Qwen3VLProcessor]:
    """A random Qwen3.5-MoE-architecture model and its processor (Qwen3-VL's).

    :func:`~hooked_vllm.tiny_models.qwen3_5.tiny_qwen3_5`'s model (4 layers: Gated DeltaNet at 0
    and 2, gated softmax attention at 1 and 3; the same ViT and prompt) with every MLP a sparse MoE
    block: a softmax router over 4 experts, each token sent to its top 2 (weights renormalised), the
    experts' SwiGLU MLPs of 32 units, plus a shared expert of 48 units scaled by
    ``sigmoid(shared_expert_gate(x))``. Experts run in HF's eager loop (``experts_implementation``
    ``"eager"``), as the parity tests compare with.
    """
    directory = Path(directory) if directory is not None else default_dir("qwen3.5-moe")
    tokenizer, token_ids = qwen_tokenizer(directory, padding_side)
    torch.manual_seed(seed)
    kwargs = qwen3_5_text_kwargs(text, tokenizer)
    kwargs.pop("intermediate_size")  # every MLP is an MoE block: its sizes are below
    text_config = Qwen3_5MoeTextConfig(
        **kwargs,
        num_experts=QWEN3_5_MOE_EXPERTS,
        num_experts_per_tok=QWEN3_5_MOE_TOP_K,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    )
    config = Qwen3_5MoeConfig(
        vision_config=qwen3_5_vision_config(Qwen3_5MoeVisionConfig, text),
        text_config=text_config,
        tie_word_embeddings=False,
        **token_ids,
    )
    config.architectures = [Qwen3_5MoeForConditionalGeneration.__name__]
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = finish_init(Qwen3_5MoeForConditionalGeneration(config), seed, redraw_zeros=True)
    return model, qwen_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tokenizer)
