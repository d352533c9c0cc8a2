"""Tiny random-initialised VLMs built in-process, with tokenizers trained in-process.

No hub access is needed: the configs come from ``transformers`` classes, the tokenizers are
trained by ``tokenizers`` on a small built-in corpus and saved to a directory (transformer-lens
wants a tokenizer loaded from a path), and the processors are built from their classes.

These are what the tests, benchmarks and the offline demo run on.

Example:
    >>> from hooked_vllm.tiny_models import tiny_llava
    >>> hf_model, processor = tiny_llava(seed=0)
    >>> type(hf_model).__name__
    'LlavaForConditionalGeneration'
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    BlipImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
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
) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE tokenizer, save it to ``directory`` and load it back from there.

    Byte-level BPE encodes any string (no unknown tokens). ``<s>`` is prepended when ``add_bos``,
    as LLaMA/Vicuna tokenizers do.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra_special_tokens]
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


def _default_dir(kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"hooked-vllm-{kind}-"))


def _finish(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Random init gives near-zero logits spread; widen it so greedy decoding is not tie-bound.
    for name, param in model.named_parameters():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            torch.nn.init.normal_(param, std=0.5)
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
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=vision_layers,
            num_attention_heads=4,
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
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
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
