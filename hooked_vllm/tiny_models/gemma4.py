"""A tiny Gemma 4 built in-process: the dense model with per-layer embeddings and KV sharing (as
``gemma-4-E2B``/``E4B``), and its mixture-of-experts sibling (as ``gemma-4-26B-A4B``)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma4AudioFeatureExtractor,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessor,
    Gemma4Processor,
    Gemma4TextConfig,
    Gemma4VideoProcessor,
    Gemma4VisionConfig,
)

from hooked_vllm.tiny_models.common import TinyTextConfig, default_dir, finish_init, train_tokenizer

#: the real checkpoints' marker tokens (their tokenizer_config.json names them so)
_GEMMA4_TOKENS = {
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
}
#: patch side (pixels), pooling kernel (patches per soft token along each side), soft-token budget
#: (the smallest the image processor takes: 70)
_PATCH, _POOL, _MAX_SOFT_TOKENS = 4, 2, 70
#: routed experts per MoE layer, and how many each token is sent to (26B-A4B: 128, top 8)
GEMMA4_MOE_EXPERTS, GEMMA4_MOE_TOP_K = 4, 2


def tiny_gemma4(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(n_layers=5),
    padding_side: str = "left",
    sliding_window: int = 8,
) -> tuple[Gemma4ForConditionalGeneration, Gemma4Processor]:
    """A random Gemma-4-architecture model (the dense E2B/E4B layout) and its processor.

    Text layers S, F, S, S, F (S: sliding window ``sliding_window``, head dim 16, default RoPE; F: full
    attention, head dim 32, proportional RoPE on a quarter of it). Per-layer embeddings (8 per layer)
    gate into every layer; the last 2 layers reuse the keys and values of the last earlier layer of
    their type (layer 3 those of layer 2, layer 4 those of layer 1). An image's soft tokens attend to
    each other both ways in the sliding layers only. Logits are soft-capped at 30.

    Images keep their aspect ratio within 70 soft tokens (4-pixel patches pooled 2 x 2): the test
    images of 48x24, 24x48 and 40x40 give 55, 55 and 64. The prompt writes ``<|image|>``; the
    processor expands it to ``<|image>``, the soft tokens and ``<image|>``. All-one parameters and
    buffers (norm scales, ``layer_scalar``, the vision position table) are re-drawn, as are zeros.
    """
    return _tiny(
        seed=seed,
        directory=directory,
        text=text,
        padding_side=padding_side,
        sliding_window=sliding_window,
        kind="gemma4",
        text_kwargs=dict(hidden_size_per_layer_input=8, num_kv_shared_layers=2),
    )


def tiny_gemma4_moe(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(n_layers=4),
    padding_side: str = "left",
    sliding_window: int = 8,
) -> tuple[Gemma4ForConditionalGeneration, Gemma4Processor]:
    """:func:`tiny_gemma4`'s model in the 26B-A4B layout: no per-layer embeddings and no KV sharing,
    layers S, F, S, F, full-attention layers with one key/value head whose keys are also its values
    (``attention_k_eq_v``), and in every layer a routed mixture of 4 experts (top 2, 32 units) beside
    the dense MLP, each branch normed and their sum normed again."""
    return _tiny(
        seed=seed,
        directory=directory,
        text=text,
        padding_side=padding_side,
        sliding_window=sliding_window,
        kind="gemma4-moe",
        text_kwargs=dict(
            hidden_size_per_layer_input=0,
            attention_k_eq_v=True,
            num_global_key_value_heads=1,
            enable_moe_block=True,
            num_experts=GEMMA4_MOE_EXPERTS,
            top_k_experts=GEMMA4_MOE_TOP_K,
            moe_intermediate_size=32,
        ),
    )


def _tiny(
    *,
    seed: int,
    directory: str | Path | None,
    text: TinyTextConfig,
    padding_side: str,
    sliding_window: int,
    kind: str,
    text_kwargs: dict,
) -> tuple[Gemma4ForConditionalGeneration, Gemma4Processor]:
    directory = Path(directory) if directory is not None else default_dir(kind)
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        extra_special_tokens=(),
        named_special_tokens=_GEMMA4_TOKENS,
        padding_side=padding_side,
    )
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(
            patch_size=_PATCH, max_soft_tokens=_MAX_SOFT_TOKENS, pooling_kernel_size=_POOL
        ),
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(
            patch_size=_PATCH, max_soft_tokens=_MAX_SOFT_TOKENS, pooling_kernel_size=_POOL
        ),
        image_seq_length=_MAX_SOFT_TOKENS,
    )
    tokenizer = processor.tokenizer  # now with the processor's <|video|>
    torch.manual_seed(seed)
    n = text.n_layers
    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"][: n - 1]
    text_config = Gemma4TextConfig(
        vocab_size=len(tokenizer),
        vocab_size_per_layer_input=len(tokenizer),
        head_dim=text.head_dim,
        global_head_dim=2 * text.head_dim,
        sliding_window=sliding_window,
        layer_types=[*layer_types, "full_attention"],
        use_bidirectional_attention="vision",
        final_logit_softcapping=30.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **text._sizes(),
        **text_kwargs,
    )
    vision_config = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        patch_size=_PATCH,
        pooling_kernel_size=_POOL,
        position_embedding_size=64,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in _GEMMA4_TOKENS.items()}
    config = Gemma4Config(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=None,
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        image_token_id=ids["image_token"],
        video_token_id=tokenizer.convert_tokens_to_ids(processor.video_token),
        boa_token_id=ids["boa_token"],
        eoa_token_index=ids["eoa_token"],
        audio_token_id=ids["audio_token"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Gemma4ForConditionalGeneration"]
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = Gemma4ForConditionalGeneration(config)
    model = finish_init(model, seed, embed_std=0.1, redraw_zeros=True)
    _redraw_ones(model, seed)
    return model.eval(), processor


def _redraw_ones(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter and buffer that is all ones around 1 (norm scales, ``layer_scalar``,
    the router's scales, the vision position table): ones hide a scale applied twice or not at all."""
    generator = torch.Generator().manual_seed(seed + 1)
    tensors = [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        for tensor in tensors:
            if tensor.is_floating_point() and tensor.numel() and bool((tensor == 1).all()):
                noise = torch.rand(tensor.shape, generator=generator) * 0.4 - 0.2
                tensor.copy_(1 + noise.to(tensor.dtype))
