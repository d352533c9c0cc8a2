"""Tiny random-initialised VLMs built in-process, with tokenizers trained in-process.

No hub access is needed: the configs come from ``transformers`` classes, the tokenizers are
trained by ``tokenizers`` on a small built-in corpus and saved to a directory (transformer-lens
wants a tokenizer loaded from a path), and the processors are built from their classes.

Families: LLaVA-1.5 (:func:`tiny_llava`), InstructBLIP (:func:`tiny_instructblip`), LLaVA-NeXT
(:func:`tiny_llava_next`), Qwen2-VL (:func:`tiny_qwen2_vl`), Qwen2.5-VL (:func:`tiny_qwen2_5_vl`) and
Gemma 3 (:func:`tiny_gemma3`). Every processor survives ``save_pretrained`` then
``AutoProcessor.from_pretrained`` offline, with the same outputs.

These are what the tests, benchmarks and the offline demo run on.

Example:
    >>> from hooked_vllm.tiny_models import tiny_llava
    >>> hf_model, processor = tiny_llava(seed=0)
    >>> type(hf_model).__name__
    'LlavaForConditionalGeneration'
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    BlipImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLTextConfig,
    Qwen2VLVideoProcessor,
    Qwen2VLVisionConfig,
    SiglipVisionConfig,
)

IMAGE_TOKEN = "<image>"

_CORPUS = [
    "Describe the image in one sentence.",
    "A photo of a cat sitting on a red sofa next to a window.",
    "Two dogs run across the green grass in the park.",
    "What colour is the square? The square is blue.",
    "How many shapes are there? There are three shapes.",
    "Is the circle left of the triangle? Yes, it is.",
    "A man rides a bicycle down a busy city street at night.",
    "The kitchen has white cabinets, a sink and a wooden table.",
    "An old mug holds coffee beside a laptop and a notebook.",
    "USER: ASSISTANT: Question: Answer: Short answer:",
    "a the of and in on with to is are there what which where who how many",
    "red green blue yellow orange purple black white gray brown pink",
    "circle square triangle star cross shape shapes left right above below",
    "cat dog bird horse person people car bus train plane boat",
    "0 1 2 3 4 5 6 7 8 9 one two three four five",
]


def train_tokenizer(
    directory: str | Path,
    *,
    vocab_size: int = 400,
    add_bos: bool = True,
    extra_special_tokens: tuple[str, ...] = (IMAGE_TOKEN,),
    padding_side: str = "left",
    named_special_tokens: Mapping[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE tokenizer, save it to ``directory`` and load it back from there.

    Byte-level BPE encodes any string (no unknown tokens). ``<s>`` is prepended when ``add_bos``,
    as LLaMA/Vicuna tokenizers do. ``named_special_tokens`` (attribute -> token, e.g.
    ``{"boi_token": "<start_of_image>"}``) become special tokens and tokenizer attributes that survive
    the save, as a real checkpoint's ``tokenizer_config.json`` has them (Gemma 3's processor reads them).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    named = dict(named_special_tokens or {})
    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra_special_tokens]
    specials += [t for t in named.values() if t not in specials]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side=padding_side,
        add_bos_token=add_bos,
        **({"extra_special_tokens": named} if named else {}),
    )
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@dataclass(frozen=True)
class TinyTextConfig:
    """Sizes of the LLaMA-style text backbone of a tiny VLM."""

    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 128
    n_ctx: int = 512

    def llama_config(self, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.d_model,
            intermediate_size=self.d_mlp,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.n_ctx,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )

    def qwen2_config(self, tokenizer: PreTrainedTokenizerFast, **overrides) -> Qwen2Config:
        """A Qwen2 backbone (no BOS, untied head) of these sizes: LLaVA-OneVision's, InternVL's."""
        return Qwen2Config(
            vocab_size=len(tokenizer),
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **overrides,
            **self._sizes(),
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def _sizes(self) -> dict:
        """The sizes as the keywords every HF text config here takes."""
        return dict(
            hidden_size=self.d_model,
            intermediate_size=self.d_mlp,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.n_ctx,
        )


#: The vision tower of every tiny model with a CLIP/SigLIP-style config (hidden size, MLP, depth, heads).
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def _default_dir(kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"hooked-vllm-{kind}-"))


def _finish(
    model: torch.nn.Module,
    seed: int,
    *,
    embed_std: float = 0.5,
    widen: tuple[str, ...] = (),
    redraw_zeros: bool = False,
) -> torch.nn.Module:
    """Re-draw some parameters after HF's init, then switch to eval mode.

    Random init gives near-zero logits spread; the token embedding and the LM head are re-drawn with
    ``embed_std`` so greedy decoding is not tie-bound (Gemma 3 wants less: its embedding is scaled by
    sqrt(d_model)). Parameters whose names end with one of ``widen`` are re-drawn with std 0.5. With
    ``redraw_zeros``, every parameter that is all zero (biases, ``(1 + w)`` norms, Gemma 3's
    ``mm_input_projection_weight``) is re-drawn too: zeros hide bugs, e.g. a zero projection makes every
    image feature 0 and image parity pass trivially. The defaults re-draw only the embedding and the head
    (what :func:`tiny_llava` and :func:`tiny_instructblip` have always had).
    """
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            torch.nn.init.normal_(param, std=embed_std)
        elif widen and name.endswith(widen):
            torch.nn.init.normal_(param, std=0.5)
        elif redraw_zeros and not param.detach().any():
            torch.nn.init.normal_(param, std=0.1 if param.dim() == 1 else 0.05)
    return model.eval()


def tiny_llava(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    image_size: int = 30,
    patch_size: int = 6,
    vision_layers: int = 2,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    padding_side: str = "left",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random LLaVA-1.5-architecture model (CLIP tower, 2-layer MLP projector, LLaMA) and its processor.

    With the defaults: 25 image tokens (30px / patch 6, CLS dropped), 3 text layers with grouped-query
    attention (4 query heads, 2 key/value heads), eager attention, float32.
    """
    directory = Path(directory) if directory is not None else _default_dir("llava")
    tokenizer = train_tokenizer(directory / "tokenizer", padding_side=padding_side)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            **{**TINY_VISION, "num_hidden_layers": vision_layers},
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        text_config=text.llama_config(len(tokenizer), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = _finish(LlavaForConditionalGeneration(config), seed)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    return model, processor


def tiny_instructblip(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    image_size: int = 30,
    patch_size: int = 6,
    num_query_tokens: int = 8,
    padding_side: str = "left",
) -> tuple[InstructBlipForConditionalGeneration, InstructBlipProcessor]:
    """A random InstructBLIP-architecture model (ViT, Q-Former, projection, LLaMA) and its processor.

    The processor is round-tripped through ``save_pretrained``/``from_pretrained``, which is how
    real checkpoints deliver it (building it directly mishandles the image token in this
    transformers version).
    """
    directory = Path(directory) if directory is not None else _default_dir("instructblip")
    tokenizer = train_tokenizer(directory / "tokenizer", padding_side=padding_side)
    # The Q-Former's BERT-style tokenizer: no BOS, right padding (absolute positions).
    qformer_tokenizer = train_tokenizer(
        directory / "qformer_tokenizer",
        add_bos=False,
        extra_special_tokens=(),
        padding_side="right",
    )
    torch.manual_seed(seed)
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            **TINY_VISION,
            image_size=image_size,
            patch_size=patch_size,
        ).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qformer_tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            encoder_hidden_size=32,
            cross_attention_frequency=1,
            pad_token_id=qformer_tokenizer.pad_token_id,
        ).to_dict(),
        text_config=text.llama_config(len(tokenizer), tokenizer).to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    config.architectures = ["InstructBlipForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = _finish(InstructBlipForConditionalGeneration(config), seed)
    torch.nn.init.normal_(model.query_tokens, std=0.5)
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    tokenizer.image_token = IMAGE_TOKEN
    processor = InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=num_query_tokens,
    )
    processor.save_pretrained(directory / "processor")
    processor = InstructBlipProcessor.from_pretrained(directory / "processor")
    return model, processor


def tiny_llava_next(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random LLaVA-NeXT-architecture model (CLIP tower, AnyRes tiles, MLP projector, LLaMA) + processor.

    Tiles are 24px with patch 6 (16 slots per tile, CLS dropped) and the grid pinpoints are 24x48,
    48x24 and 48x48, so an image gets one base tile plus a 1x2, 2x1 or 2x2 canvas, unpadded to the
    image's aspect, each canvas row followed by an ``image_newline`` slot. All-zero parameters and
    ``image_newline`` are re-drawn. Prompt: ``"USER: <image>\\n{text} ASSISTANT:"``.
    """
    directory = Path(directory) if directory is not None else _default_dir("llava-next")
    tokenizer = train_tokenizer(directory / "tokenizer", padding_side=padding_side)
    image_size, patch_size = 24, 6
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            **TINY_VISION,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        text_config=text.llama_config(len(tokenizer), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = _finish(
        LlavaNextForConditionalGeneration(config), seed, widen=("image_newline",), redraw_zeros=True
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


_QWEN_TOKENS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}


def _qwen_text_kwargs(text: TinyTextConfig, tokenizer: PreTrainedTokenizerFast) -> dict:
    # M-RoPE splits the head's rotary half into (temporal, height, width) sections, 1/4 : 3/8 : 3/8 like Qwen.
    half = text.head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [temporal, height, half - temporal - height],
        },
        **text._sizes(),
    )


#: The tiny Qwen-VLs' geometry: patch 4, 2x2 merge, 2 frames per temporal patch (a slot is 8x8 px)
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2


def _qwen_tokenizer(directory: Path, padding_side: str) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """A tokenizer with Qwen's vision tokens (no BOS) and the config keywords naming their ids."""
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        add_bos=False,
        extra_special_tokens=tuple(_QWEN_TOKENS.values()),
        padding_side=padding_side,
    )
    return tokenizer, {key: tokenizer.convert_tokens_to_ids(token) for key, token in _QWEN_TOKENS.items()}


def _qwen_processor(processor_class: type, video_processor_class: type, tokenizer: Any) -> Any:
    """A Qwen-VL processor of the tiny geometry; images between 2x2 and 8x8 merged slots."""
    factor = QWEN_PATCH * QWEN_MERGE
    sizes = dict(patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)
    return processor_class(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (8 * factor) ** 2}, **sizes
        ),
        tokenizer=tokenizer,
        video_processor=video_processor_class(**sizes),
    )


def _tiny_qwen(kind, seed, directory, text, padding_side, *, v2_5):
    directory = Path(directory) if directory is not None else _default_dir(kind)
    tokenizer, token_ids = _qwen_tokenizer(directory, padding_side)
    patch_size, merge_size, temporal_patch_size = QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL
    torch.manual_seed(seed)
    if v2_5:
        vision = Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=patch_size,
            spatial_merge_size=merge_size,
            temporal_patch_size=temporal_patch_size,
            window_size=16,
            out_hidden_size=text.d_model,
            fullatt_block_indexes=[1],
        )
        config = Qwen2_5_VLConfig(
            vision_config=vision,
            text_config=Qwen2_5_VLTextConfig(**_qwen_text_kwargs(text, tokenizer)),
            tie_word_embeddings=False,
            **token_ids,
        )
        model_class, processor_class = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    else:
        vision = Qwen2VLVisionConfig(
            depth=2,
            embed_dim=32,
            hidden_size=text.d_model,
            num_heads=4,
            mlp_ratio=2,
            patch_size=patch_size,
            spatial_merge_size=merge_size,
            temporal_patch_size=temporal_patch_size,
        )
        config = Qwen2VLConfig(
            vision_config=vision,
            text_config=Qwen2VLTextConfig(**_qwen_text_kwargs(text, tokenizer)),
            tie_word_embeddings=False,
            **token_ids,
        )
        model_class, processor_class = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    config.architectures = [model_class.__name__]
    config._attn_implementation = "eager"
    model = _finish(model_class(config), seed, redraw_zeros=True)
    return model, _qwen_processor(processor_class, Qwen2VLVideoProcessor, tokenizer)


def tiny_qwen2_vl(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """A random Qwen2-VL-architecture model (native-resolution ViT with 2x2 patch merging, M-RoPE Qwen2 LM).

    Patch 4 and merge 2: each ``<|image_pad|>`` slot covers 8x8 pixels, images are resized to multiples
    of 8 between 16x16 and 64x64 pixels' area. No BOS. All-zero parameters are re-drawn.
    Prompt: ``"<|vision_start|><|image_pad|><|vision_end|>{text}"``.
    """
    return _tiny_qwen("qwen2-vl", seed, directory, text, padding_side, v2_5=False)


def tiny_qwen2_5_vl(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A random Qwen2.5-VL-architecture model (windowed ViT with RMSNorm/SwiGLU, 2x2 merging, M-RoPE LM).

    As :func:`tiny_qwen2_vl`, with a 16px attention window in the first vision block and full attention
    in the second. Prompt: ``"<|vision_start|><|image_pad|><|vision_end|>{text}"``.
    """
    return _tiny_qwen("qwen2.5-vl", seed, directory, text, padding_side, v2_5=True)


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
    directory = Path(directory) if directory is not None else _default_dir("gemma3")
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
    model = _finish(Gemma3ForConditionalGeneration(config), seed, embed_std=0.1, redraw_zeros=True)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        image_seq_length=mm_tokens_per_image,
    )
    return model, processor


def family_builders() -> dict[str, Callable[..., tuple[torch.nn.Module, Any]]]:
    """``{family: builder}`` for every tiny model: the ``tiny_<family>`` functions of this module and
    of its submodules (``hooked_vllm/tiny_models/<family>.py``: a new family's builder goes there)."""
    modules = [sys.modules[__name__]] + [
        importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)
    ]
    return {
        name[len("tiny_") :]: function
        for module in modules
        for name, function in sorted(vars(module).items())
        if name.startswith("tiny_")
        and inspect.isfunction(function)
        and function.__module__ == module.__name__
    }
