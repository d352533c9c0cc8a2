"""A tiny Gemma 3n built in-process: the real layout (AltUp's 4 residual streams, LAuReL, per-layer
embeddings, KV sharing, activation sparsity, a MobileNetV5 vision tower) at toy sizes. Needs timm."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Gemma3nAudioConfig,
    Gemma3nAudioFeatureExtractor,
    Gemma3nConfig,
    Gemma3nForConditionalGeneration,
    Gemma3nProcessor,
    Gemma3nTextConfig,
    Gemma3nVisionConfig,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
)

from hooked_vllm.adapters.gemma3n import require_timm
from hooked_vllm.tiny_models.common import TinyTextConfig, default_dir, finish_init, train_tokenizer

#: the real checkpoints' marker tokens. ``<start_of_image>``/``<start_of_audio>`` are text tokens;
#: the others lie past the text vocabulary, in the vision then the audio range (as in the real
#: vocabulary, where ``<end_of_image>`` is the first id of the vision range)
_TEXT_MARKERS = {"boi_token": "<start_of_image>", "boa_token": "<start_of_audio>"}
_VISION_MARKERS = {"eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
_AUDIO_MARKERS = {"eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"}
#: image side in pixels, and the soft tokens per image (the MobileNetV5's fused grid, 4 x 4)
_IMAGE_SIZE, _GRID = 64, 4
#: a 4-stage MobileNetV5 as the real ``mobilenetv5_300m_enc`` (inverted residual, universal inverted
#: residual and multi-query attention blocks, the last two stages fused), at 8 to 32 channels
_VISION_ARCH = [
    ["er_r1_k3_s2_e4_c8"],
    ["uir_r1_a3_k5_s2_e4_c16"],
    ["uir_r1_a5_k5_s2_e4_c16", "mqa_r1_k3_h2_s2_d8_c16", "uir_r1_a0_k0_s1_e2_c16"],
    ["uir_r1_a5_k5_s2_e4_c32", "mqa_r1_k3_h2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"],
]


def tiny_gemma3n(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(n_layers=5),
    padding_side: str = "left",
    sliding_window: int = 8,
) -> tuple[Gemma3nForConditionalGeneration, Gemma3nProcessor]:
    """A random Gemma-3n-architecture model and its processor.

    Text layers S, S, F, S, F (S: sliding window ``sliding_window``, F: full attention); the last 2
    reuse the keys and values of the last earlier layer of their type (layer 3 those of layer 1, layer 4
    those of layer 2). 4 AltUp streams (stream 0 active), LAuReL rank 8, per-layer embeddings of 8 per
    layer, activation sparsity 0.95 on layer 0. Logits are soft-capped at 30. Every image is resized to
    64 x 64 and fills 16 soft tokens (``_GRID`` x ``_GRID``, row-major); a prompt writes
    ``<image_soft_token>``, which the processor expands to ``\\n\\n<start_of_image>``, the 16 soft
    tokens, ``<end_of_image>\\n\\n``. Zero and all-one parameters are re-drawn (``correct_output_scale``
    starts at 0, which would make the per-layer inputs vanish).
    """
    require_timm()
    directory = Path(directory) if directory is not None else default_dir("gemma3n")
    tokenizer = _tokenizer(directory / "tokenizer", padding_side)
    n_text = len(tokenizer) - len(_VISION_MARKERS) - len(_AUDIO_MARKERS)
    torch.manual_seed(seed)
    n = text.n_layers
    text_config = Gemma3nTextConfig(
        vocab_size=len(tokenizer),
        vocab_size_per_layer_input=n_text,
        head_dim=text.head_dim,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"][: n - 1]
        + ["full_attention"],
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=2,
        laurel_rank=8,
        activation_sparsity_pattern=[0.95] + [0.0] * (n - 1),
        final_logit_softcapping=30.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **text._sizes(),
    )
    from timm.models._efficientnet_builder import decode_arch_def

    vision_config = Gemma3nVisionConfig(
        model_args={
            "block_args": decode_arch_def(_VISION_ARCH),
            "stem_size": 8,
            "msfa_output_resolution": _GRID,
        },
        vocab_offset=n_text,
        vocab_size=len(_VISION_MARKERS),
        num_labels=0,
    )
    audio_config = Gemma3nAudioConfig(
        vocab_offset=n_text + len(_VISION_MARKERS),
        vocab_size=len(_AUDIO_MARKERS),
        hidden_size=16,
        conf_num_attention_heads=2,
        conf_num_hidden_layers=1,
        sscp_conv_channel_size=(8, 4),
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in _all_markers().items()}
    config = Gemma3nConfig(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        vision_soft_tokens_per_image=_GRID * _GRID,
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        image_token_id=ids["image_token"],
        boa_token_id=ids["boa_token"],
        eoa_token_id=ids["eoa_token"],
        audio_token_id=ids["audio_token"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Gemma3nForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = Gemma3nForConditionalGeneration(config)
    # timm's builder fills the block dicts it is given with classes: keep the config's JSON-clean
    model.config.vision_config.model_args["block_args"] = decode_arch_def(_VISION_ARCH)
    model = finish_init(model, seed, embed_std=0.1, redraw_zeros=True)
    _redraw_ones(model, seed)
    _redraw_layer_scales(model, seed)
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=SiglipImageProcessor(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}),
        tokenizer=tokenizer,
        image_seq_length=_GRID * _GRID,
    )
    return model.eval(), processor


def _all_markers() -> dict[str, str]:
    return {**_TEXT_MARKERS, **_VISION_MARKERS, **_AUDIO_MARKERS}


def _tokenizer(directory: Path, padding_side: str) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with the vision then the audio markers as its last ids."""
    trained = train_tokenizer(
        directory / "trained",
        extra_special_tokens=(),
        named_special_tokens=_TEXT_MARKERS,
        padding_side=padding_side,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=trained.backend_tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side=padding_side,
        add_bos_token=True,
        extra_special_tokens=_all_markers(),
    )
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def _redraw_ones(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every floating parameter that is all ones around 1 (norm scales): ones hide a scale
    applied twice or not at all."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.is_floating_point() and tensor.numel() and bool((tensor == 1).all()):
                noise = torch.rand(tensor.shape, generator=generator) * 0.4 - 0.2
                tensor.copy_(1 + noise.to(tensor.dtype))


def _redraw_layer_scales(model: torch.nn.Module, seed: int) -> None:
    """Re-draw the vision blocks' layer scales (timm starts them at 1e-5) in [0.5, 1.5]: at 1e-5 every
    stage's output is ~1e-5 and the embedder's norms blow its rounding up to the size of the features."""
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("layer_scale.gamma"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator).to(tensor.dtype))
