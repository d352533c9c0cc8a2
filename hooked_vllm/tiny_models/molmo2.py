"""A tiny Molmo 2 (``Molmo2ForConditionalGeneration``, transformers-native): a ViT on a low-resolution
view plus overlapping high-resolution crops, two ViT layers concatenated, attention pooling of 2x2
patches, an MLP projector, and a Qwen3-style language model (per-head q/k norms) whose image features
are *added* to the patch tokens' embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Molmo2AdapterConfig,
    Molmo2Config,
    Molmo2ForConditionalGeneration,
    Molmo2ImageProcessor,
    Molmo2Processor,
    Molmo2TextConfig,
    Molmo2VideoProcessor,
    Molmo2VisionConfig,
)

from hooked_vllm.tiny_models.common import (
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    train_tokenizer,
)

#: the image tokens Molmo2Processor writes (and reads from the tokenizer), then the image and video
#: placeholders a prompt holds: in the real checkpoints all of them lie in the *additional* vocabulary
#: (ids >= ``text_config.vocab_size``), embedded but never predicted
_MOLMO2_TOKENS = (
    "<im_patch>",
    "<im_col>",
    "<im_start>",
    "<low_res_im_start>",
    "<frame_start>",
    "<im_end>",
    "<frame_end>",
    "<im_low>",
    "<|image|>",
    "<|video|>",
)
#: re-drawn with std 0.5: at HF's init (std 0.02) the patch content barely reaches the pooled
#: features (their std across tokens 2e-3, their size 1e-5 next to embeddings of 0.5), so an image
#: would hardly change the logits; with these, the features' std is 1.8, 1.7 across tokens
_WIDEN = (
    "patch_embedding.weight",
    "image_pooling_2d.v_proj.weight",
    "image_pooling_2d.o_proj.weight",
    "image_projector.down_proj.weight",
)
#: the ChatML turn markers of Molmo2's (Qwen3's) chat template
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def tiny_molmo2(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
    crop_size: int = 16,
    patch_size: int = 4,
    max_crops: int = 4,
) -> tuple[Molmo2ForConditionalGeneration, Molmo2Processor]:
    """A random Molmo2-architecture model and its processor.

    Geometry with the defaults: crops of 16x16 pixels, patch 4 (a 4x4 patch grid per crop), overlap
    margins of one patch, 2x2 attention pooling. Each image gets a low-resolution view (the whole
    image resized to one crop: 2x2 pooled tokens) and a canvas of 1 to ``max_crops`` (4) overlapping
    crops (HF's ``select_tiling``), pooled over the canvas's patch grid. The test images get: 48x24 ->
    1x3 crops, a 2x4 canvas grid -> 4 + 8 = 12 ``<im_patch>`` slots; 24x48 -> 3x1, 4x2 -> 12 slots;
    40x40 -> 2x2, 3x3 -> 13 slots. The processor writes each ``<|image|>`` as
    ``<low_res_im_start>`` + rows of ``<im_patch>`` each closed by ``<im_col>`` + ``<im_end>``, then
    ``<im_start>`` + the canvas's rows likewise + ``<im_end>``.

    Language model: Qwen3-style (``qk_norm_type="qwen3"``, pre-norm), with a linearly scaled RoPE on
    layers 0 and 2 and the unscaled one on layer 1 (``rope_scaling_layers``: each layer must get its
    own rotary table). The tokenizer's ``<|image|>``, ``<im_patch>``... are added after its trained
    vocabulary, in the embedding's additional rows (``additional_vocab_size``), as in the real
    checkpoints. No BOS from the tokenizer: the processor writes its ``bos_token`` at the start of
    every prompt. Left padding by default; untied head; every all-zero parameter re-drawn, and the
    parameters in :data:`_WIDEN` (the image features would be 1e-5 otherwise).
    """
    directory = Path(directory) if directory is not None else default_dir("molmo2")
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        add_bos=False,
        extra_special_tokens=_CHATML_TOKENS,
        padding_side=padding_side,
    )
    base_vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(_MOLMO2_TOKENS)})
    tokenizer.image_token, tokenizer.video_token = "<|image|>", "<|video|>"
    tokenizer.save_pretrained(directory / "tokenizer")
    ids = dict(zip(_MOLMO2_TOKENS, tokenizer.convert_tokens_to_ids(list(_MOLMO2_TOKENS)), strict=True))
    assert min(ids.values()) >= base_vocab

    torch.manual_seed(seed)
    vision = {**TINY_VISION, "num_key_value_heads": TINY_VISION["num_attention_heads"]}
    vision["head_dim"] = vision["hidden_size"] // vision["num_attention_heads"]
    config = Molmo2Config(
        vision_config=Molmo2VisionConfig(**vision, image_size=[crop_size, crop_size], patch_size=patch_size),
        adapter_config=Molmo2AdapterConfig(
            vision_feature_layer=[-1, 0],
            hidden_size=vision["hidden_size"],
            num_attention_heads=vision["num_attention_heads"],
            num_key_value_heads=vision["num_attention_heads"],
            head_dim=vision["head_dim"],
            intermediate_size=vision["intermediate_size"],
            text_hidden_size=text.d_model,
        ),
        text_config=Molmo2TextConfig(
            hidden_size=text.d_model,
            intermediate_size=text.d_mlp,
            num_hidden_layers=text.n_layers,
            num_attention_heads=text.n_heads,
            num_key_value_heads=text.n_kv_heads,
            head_dim=text.head_dim,
            max_position_embeddings=text.n_ctx,
            vocab_size=base_vocab,
            additional_vocab_size=len(tokenizer) - base_vocab,
            qk_norm_type="qwen3",
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            rope_scaling_layers=[layer for layer in range(text.n_layers) if layer != 1],
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        ),
        image_start_token_id=ids["<im_start>"],
        low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"],
        image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"],
        frame_end_token_id=ids["<frame_end>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Molmo2ForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = finish_init(Molmo2ForConditionalGeneration(config), seed, redraw_zeros=True, widen=_WIDEN)
    processor = Molmo2Processor(
        image_processor=Molmo2ImageProcessor(
            size={"height": crop_size, "width": crop_size},
            patch_size=patch_size,
            pooling_size=[2, 2],
            overlap_margins=[1, 1],
            max_crops=max_crops,
        ),
        video_processor=Molmo2VideoProcessor(
            size={"height": crop_size, "width": crop_size}, patch_size=patch_size, pooling_size=[2, 2]
        ),
        tokenizer=tokenizer,
    )
    return model, processor
