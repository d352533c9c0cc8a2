"""A tiny Qwen3.5 (hybrid Gated DeltaNet + gated attention) built in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
    Qwen3_5VisionConfig,
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

#: linear attention, then gated softmax attention, twice: patterns at layers 1 and 3 only
QWEN3_5_LAYER_TYPES = ["linear_attention", "full_attention"] * 2
#: Qwen3.5's heads are wider than d_model / n_heads (256 in the real models); M-RoPE rotates a
#: quarter of each (``partial_rotary_factor`` 0.25): 8 of 32 dims, 4 frequencies
QWEN3_5_HEAD_DIM = 32


def qwen3_5_text_kwargs(text: TinyTextConfig, tokenizer) -> dict:
    """The tiny hybrid text model's keywords (shared by the dense and the MoE builder)."""
    kwargs = qwen_text_kwargs(text, tokenizer)
    kwargs["num_hidden_layers"] = len(QWEN3_5_LAYER_TYPES)
    # 4 rotary frequencies, interleaved T, H, W, T (Qwen3.5 interleaves its M-RoPE sections)
    kwargs["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    }
    return dict(
        kwargs,
        head_dim=QWEN3_5_HEAD_DIM,
        layer_types=list(QWEN3_5_LAYER_TYPES),
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )


def qwen3_5_vision_config(vision_class: type, text: TinyTextConfig):
    """Qwen3-VL's tiny ViT geometry (patch 4, 2x2 merge), no DeepStack."""
    return vision_class(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TEMPORAL,
        out_hidden_size=text.d_model,
        num_position_embeddings=64,
    )


def tiny_qwen3_5(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Qwen3_5ForConditionalGeneration, Qwen3VLProcessor]:
    """A random Qwen3.5-architecture model and its processor (Qwen3-VL's, as the real checkpoints').

    Text: 4 layers, Gated DeltaNet linear attention at layers 0 and 2 (no attention pattern; a
    causal convolution and a recurrent state), gated softmax attention with q/k norms at layers 1 and
    3 (heads of 32 dims, interleaved M-RoPE on 8 of them). Vision: a 2-block ViT with learned position
    embeddings, patch 4, 2x2 merge (each ``<|image_pad|>`` slot covers 8x8 pixels). No BOS. All-zero
    parameters are re-drawn (the ``(1 + w)`` norms among them). ``text``'s ``n_layers`` is not used:
    the layer pattern is fixed. Prompt: ``"<|vision_start|><|image_pad|><|vision_end|>{text}"``.
    """
    directory = Path(directory) if directory is not None else default_dir("qwen3.5")
    tokenizer, token_ids = qwen_tokenizer(directory, padding_side)
    torch.manual_seed(seed)
    config = Qwen3_5Config(
        vision_config=qwen3_5_vision_config(Qwen3_5VisionConfig, text),
        text_config=Qwen3_5TextConfig(**qwen3_5_text_kwargs(text, tokenizer)),
        tie_word_embeddings=False,
        **token_ids,
    )
    config.architectures = [Qwen3_5ForConditionalGeneration.__name__]
    config._attn_implementation = "eager"
    model = finish_init(Qwen3_5ForConditionalGeneration(config), seed, redraw_zeros=True)
    return model, qwen_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tokenizer)
