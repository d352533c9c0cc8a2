"""A tiny Qwen3-VL-MoE (Qwen3-VL's DeepStack with sparse mixture-of-experts MLPs) built in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeTextConfig,
    Qwen3VLMoeVisionConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from hooked_vllm.tiny_models.common import TinyTextConfig, default_dir, finish_init
from hooked_vllm.tiny_models.qwen2_vl import (
    QWEN_MERGE,
    QWEN_PATCH,
    QWEN_TEMPORAL,
    qwen_processor,
    qwen_text_kwargs,
    qwen_tokenizer,
)

#: routed experts per MoE layer, and how many each token is sent to (Qwen3-VL-30B-A3B: 128, top-8)
QWEN3_VL_MOE_EXPERTS, QWEN3_VL_MOE_TOP_K = 4, 2
#: the layers whose MLP is dense (``mlp_only_layers``); the others are sparse MoE blocks
QWEN3_VL_MOE_DENSE_LAYERS = (1,)


def tiny_qwen3_vl_moe(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor]:
    """A random Qwen3-VL-MoE-architecture model and its processor (Qwen3-VL's).

    :func:`~hooked_vllm.tiny_models.qwen3_vl.tiny_qwen3_vl`'s model (3-block ViT, 2x2 merge,
    DeepStack features of vision blocks 0 and 1 added after text layers 0 and 1, interleaved M-RoPE,
    q/k norms; the same prompt) with the MLPs of layers 0 and 2 sparse MoE blocks: a softmax router
    over 4 experts, each token sent to its top 2 (weights renormalised), SwiGLU experts of 32 units,
    no shared expert. Layer 1 keeps a dense MLP (``mlp_only_layers=[1]``; the real checkpoints have
    none, the config allows it). Experts run in HF's eager loop (``experts_implementation``
    ``"eager"``), as the parity tests compare with.
    """
    directory = Path(directory) if directory is not None else default_dir("qwen3-vl-moe")
    tokenizer, token_ids = qwen_tokenizer(directory, padding_side)
    torch.manual_seed(seed)
    text_kwargs = qwen_text_kwargs(text, tokenizer)
    text_kwargs["rope_parameters"]["mrope_interleaved"] = True
    vision = Qwen3VLMoeVisionConfig(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TEMPORAL,
        out_hidden_size=text.d_model,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    )
    text_config = Qwen3VLMoeTextConfig(
        head_dim=text.head_dim,
        num_experts=QWEN3_VL_MOE_EXPERTS,
        num_experts_per_tok=QWEN3_VL_MOE_TOP_K,
        moe_intermediate_size=32,
        mlp_only_layers=list(QWEN3_VL_MOE_DENSE_LAYERS),
        **text_kwargs,
    )
    config = Qwen3VLMoeConfig(
        vision_config=vision,
        text_config=text_config,
        tie_word_embeddings=False,
        **token_ids,
    )
    config.architectures = [Qwen3VLMoeForConditionalGeneration.__name__]
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = finish_init(Qwen3VLMoeForConditionalGeneration(config), seed, redraw_zeros=True)
    return model, qwen_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tokenizer)
