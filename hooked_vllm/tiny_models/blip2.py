"""A tiny BLIP-2 (OPT backbone) built in-process."""

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    OPTConfig,
)

from hooked_vllm.tiny_models.common import (
    IMAGE_TOKEN,
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    train_tokenizer,
)

#: re-drawn with std 0.5: at HF's init (std 0.02) the patch embedding and the Q-Former's
#: cross-attention are so small against the class/position embeddings and the learned queries that
#: every image gives the same visual prefix (measured: 6e-8 apart), and image tests pass trivially
WIDEN = (
    "patch_embedding.weight",
    "crossattention.attention.key.weight",
    "crossattention.attention.value.weight",
    "crossattention.output.dense.weight",
)
#: the ViT blocks' matrices, which HF's BLIP init leaves at std 1e-10 (every block then adds only its
#: biases and attention is exactly uniform, so no test of ``vision.blocks.*`` could tell one block
#: from another); std 0.2 gives peaked but not one-hot attention (top weights 0.6-0.8)
VIT_BLOCKS = {r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(qkv|projection)|mlp\.fc[12])\.weight$": 0.2}


def tiny_blip2(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    image_size: int = 30,
    patch_size: int = 6,
    num_query_tokens: int = 8,
    padding_side: str = "left",
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A random BLIP-2-architecture model (ViT, Q-Former, projection, OPT) and its processor.

    OPT as in ``Salesforce/blip2-opt-*``: learned absolute positions (offset 2), pre-norm LayerNorm
    blocks with biases, ReLU MLP; 4 heads of 16 dims (OPT has no grouped KV heads). The head is
    untied from the token embedding (the real models tie them; tied, this random model's greedy
    decoding repeats its last token, so generation tests would compare one token over and over).
    BOS ``<s>``. The processor writes ``num_query_tokens`` ``<image>`` slots before the tokenized
    (already padded) text, and is round-tripped through ``save_pretrained``. All-zero parameters
    (biases) are re-drawn; the patch embedding and the Q-Former's cross-attention widened (``WIDEN``).
    """
    directory = Path(directory) if directory is not None else default_dir("blip2")
    tokenizer = train_tokenizer(directory / "tokenizer", padding_side=padding_side)
    torch.manual_seed(seed)
    opt = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=text.d_model,
        ffn_dim=text.d_mlp,
        num_hidden_layers=text.n_layers,
        num_attention_heads=text.n_heads,
        max_position_embeddings=text.n_ctx,
        word_embed_proj_dim=text.d_model,
        do_layer_norm_before=True,
        dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            **TINY_VISION, image_size=image_size, patch_size=patch_size
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            encoder_hidden_size=TINY_VISION["hidden_size"],
            cross_attention_frequency=1,
        ).to_dict(),
        text_config=opt.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    config.architectures = ["Blip2ForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = finish_init(
        Blip2ForConditionalGeneration(config), seed, redraw_zeros=True, widen=WIDEN, redraw=VIT_BLOCKS
    )
    torch.nn.init.normal_(model.query_tokens, std=0.5)
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens
    )
    processor.save_pretrained(directory / "processor")
    return model, Blip2Processor.from_pretrained(directory / "processor")
