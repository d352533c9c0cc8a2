"""A tiny InstructBLIP (Vicuna/LLaMA backbone) built in-process."""

from pathlib import Path

import torch
from transformers import (
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
)

from hooked_vllm.tiny_models.blip2 import VIT_BLOCKS, WIDEN
from hooked_vllm.tiny_models.common import (
    IMAGE_TOKEN,
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    train_tokenizer,
)

# WIDEN, VIT_BLOCKS: BLIP-2's (the same ViT and Q-Former; HF's init left the ViT at std 1e-10 and
# the cross-attention at 0.02, so two images gave visual prefixes 4e-8 apart and image tests passed
# trivially)


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
    transformers version). The patch embedding and the Q-Former's cross-attention are widened
    (``WIDEN``) so that the visual prefix depends on the image.
    """
    directory = Path(directory) if directory is not None else default_dir("instructblip")
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
    model = finish_init(InstructBlipForConditionalGeneration(config), seed, widen=WIDEN, redraw=VIT_BLOCKS)
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
