"""Tiny GLM-4.1V (``Glm4vForConditionalGeneration``), GLM-4.5V (``Glm4vMoeForConditionalGeneration``)
and GLM-4.6V (``Glm46VForConditionalGeneration``) built in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessor,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
    Glm4vMoeTextConfig,
    Glm4vProcessor,
    Glm4vTextConfig,
    Glm4vVideoProcessor,
    Glm4vVisionConfig,
    Glm46VConfig,
    Glm46VForConditionalGeneration,
    Glm46VProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from hooked_vllm.tiny_models.common import TinyTextConfig, default_dir, finish_init, train_tokenizer

_GLM_TOKENS = {
    "image_token_id": "<|image|>",
    "video_token_id": "<|video|>",
    "image_start_token_id": "<|begin_of_image|>",
    "image_end_token_id": "<|end_of_image|>",
    "video_start_token_id": "<|begin_of_video|>",
    "video_end_token_id": "<|end_of_video|>",
}

#: The tiny GLM-Vs' geometry: patch 4, 2x2 merge, 2 frames per temporal patch (a slot is 8x8 px)
GLM_PATCH, GLM_MERGE, GLM_TEMPORAL = 4, 2, 2
#: routed experts per MoE layer, expert groups, groups kept per token, experts per token (GLM-4.5V:
#: 128 experts, 1 group, top-8) and the dense first layers (``first_k_dense_replace``)
GLM_MOE_EXPERTS, GLM_MOE_GROUPS, GLM_MOE_TOP_GROUPS, GLM_MOE_TOP_K, GLM_MOE_DENSE = 8, 2, 1, 2, 1


def glm_tokenizer(directory: Path, padding_side: str) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """A tokenizer with GLM's vision tokens (no BOS) and the config keywords naming their ids."""
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        add_bos=False,
        extra_special_tokens=tuple(_GLM_TOKENS.values()),
        padding_side=padding_side,
    )
    return tokenizer, {key: tokenizer.convert_tokens_to_ids(token) for key, token in _GLM_TOKENS.items()}


def glm_rope(text: TinyTextConfig) -> dict:
    """GLM's text RoPE: half of each head rotated (``partial_rotary_factor`` 0.5), its frequencies
    split into (temporal, height, width) sections 1/4 : 3/8 : 3/8 (GLM-4.1V: 8, 12, 12)."""
    freqs = text.head_dim // 4
    temporal = max(freqs // 4, 1)
    height = (freqs - temporal) // 2
    return {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [temporal, height, freqs - temporal - height],
    }


def glm_vision(text: TinyTextConfig) -> Glm4vVisionConfig:
    return Glm4vVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        image_size=32,  # 8x8 learned position embeddings, interpolated to each image's grid
        patch_size=GLM_PATCH,
        spatial_merge_size=GLM_MERGE,
        temporal_patch_size=GLM_TEMPORAL,
        out_hidden_size=text.d_model,
    )


def glm_processor(processor_class: type, tokenizer: PreTrainedTokenizerFast):
    """A GLM-V processor of the tiny geometry; images between 2x2 and 8x8 merged slots."""
    factor = GLM_PATCH * GLM_MERGE
    sizes = dict(patch_size=GLM_PATCH, merge_size=GLM_MERGE, temporal_patch_size=GLM_TEMPORAL)
    # smart_resize bounds t * h * w (t = the temporal patch: 2 frames)
    bounds = {
        "shortest_edge": GLM_TEMPORAL * (2 * factor) ** 2,
        "longest_edge": GLM_TEMPORAL * (8 * factor) ** 2,
    }
    return processor_class(
        image_processor=Glm4vImageProcessor(size=bounds, **sizes),
        tokenizer=tokenizer,
        video_processor=Glm4vVideoProcessor(**sizes),
    )


def _text_kwargs(text: TinyTextConfig, tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters=glm_rope(text),
        **text._sizes(),
    )


def _finish(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    # GLM-4.5V's routers drawn wide (std 0.5), so that tokens spread over the experts
    model = finish_init(model, seed, widen=("mlp.gate.weight",), redraw_zeros=True)
    for module in model.modules():  # and their correction bias (a buffer, zero at init)
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.normal_(std=0.1)
    return model


def _build(kind, config_class, model_class, processor_class, text_config, seed, directory, text, side):
    directory = Path(directory) if directory is not None else default_dir(kind)
    tokenizer, token_ids = glm_tokenizer(directory, side)
    torch.manual_seed(seed)
    config = config_class(
        vision_config=glm_vision(text),
        text_config=text_config(_text_kwargs(text, tokenizer)),
        tie_word_embeddings=False,
        **token_ids,
    )
    config.architectures = [model_class.__name__]
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = _finish(model_class(config), seed)
    return model, glm_processor(processor_class, tokenizer)


def _moe_text(kwargs: dict) -> Glm4vMoeTextConfig:
    return Glm4vMoeTextConfig(
        n_routed_experts=GLM_MOE_EXPERTS,
        n_group=GLM_MOE_GROUPS,
        topk_group=GLM_MOE_TOP_GROUPS,
        num_experts_per_tok=GLM_MOE_TOP_K,
        n_shared_experts=1,
        moe_intermediate_size=32,
        first_k_dense_replace=GLM_MOE_DENSE,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        head_dim=kwargs["hidden_size"] // kwargs["num_attention_heads"],
        **kwargs,
    )


def tiny_glm4v(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Glm4vForConditionalGeneration, Glm4vProcessor]:
    """A random GLM-4.1V-architecture model and its processor: a 2-block ViT (learned position
    embeddings interpolated to each image's grid, 2-D RoPE, 2x2 conv downsample, patch merger) -> a
    GLM-4 text model with sandwich norms (each sublayer's output normed before its residual add),
    3-D RoPE on half of each head (adjacent pairs), a joint ``gate_up_proj`` MLP.

    Patch 4 and merge 2: each ``<|image|>`` slot covers 8x8 pixels. No BOS. All-zero parameters are
    re-drawn. Prompt: ``"<|begin_of_image|><|image|><|end_of_image|>{text}"``.
    """
    return _build(
        "glm4v",
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vProcessor,
        lambda kwargs: Glm4vTextConfig(**kwargs),
        seed,
        directory,
        text,
        padding_side,
    )


def tiny_glm4v_moe(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Glm4vMoeForConditionalGeneration, Glm4vProcessor]:
    """A random GLM-4.5V-architecture model and its processor (GLM-4.1V's): the vision side of
    :func:`tiny_glm4v` -> a GLM-4.5 MoE text model (pre-norm only, no sandwich norms; 3-D RoPE on half
    of each head, rotate-half layout). Layer 0 keeps a dense MLP (``first_k_dense_replace=1``);
    layers 1 and 2 are MoE blocks: a sigmoid router over 8 experts in 2 groups (with a drawn score
    correction bias), the best group kept, each token sent to its top 2 experts there (weights
    renormalised, times 2.5), SwiGLU experts of 32 units, and one shared expert every token goes
    through, ungated. Experts run in HF's eager loop.
    """
    return _build(
        "glm4v-moe",
        Glm4vMoeConfig,
        Glm4vMoeForConditionalGeneration,
        Glm4vProcessor,
        _moe_text,
        seed,
        directory,
        text,
        padding_side,
    )


def tiny_glm46v(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
    moe: bool = False,
) -> tuple[Glm46VForConditionalGeneration, Glm46VProcessor]:
    """A random GLM-4.6V-architecture model (``Glm46VForConditionalGeneration``: GLM-4.1V's outer model,
    its language model built from the text config by ``AutoModel``) and its processor, with
    :func:`tiny_glm4v`'s sizes and prompt. The text model is GLM-4.1V's dense one (the config's
    default), or with ``moe`` :func:`tiny_glm4v_moe`'s mixture of experts."""
    return _build(
        "glm46v",
        Glm46VConfig,
        Glm46VForConditionalGeneration,
        Glm46VProcessor,
        _moe_text if moe else lambda kwargs: Glm4vTextConfig(**kwargs),
        seed,
        directory,
        text,
        padding_side,
    )
