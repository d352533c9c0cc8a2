"""What every tiny builder shares: the tokenizer trained in-process, the text and vision sizes, and
the re-drawing of parameters after HF's init."""

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    GotOcr2ImageProcessor,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
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


def tile_image_processor(tile_size: int, max_patches: int) -> GotOcr2ImageProcessor:
    """GotOCR2's tiler (InternVL's, Aya Vision's): each image cropped to the canvas of 1 to
    ``max_patches`` square tiles of ``tile_size`` pixels closest to its aspect, plus a thumbnail when
    that is more than one tile."""
    return GotOcr2ImageProcessor(
        size={"height": tile_size, "width": tile_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_patches,
    )


def default_dir(kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"hooked-vllm-{kind}-"))


def finish_init(
    model: torch.nn.Module,
    seed: int,
    *,
    embed_std: float = 0.5,
    widen: tuple[str, ...] = (),
    redraw: dict[str, float] | None = None,
    redraw_zeros: bool = False,
) -> torch.nn.Module:
    """Re-draw some parameters after HF's init, then switch to eval mode.

    Random init gives near-zero logits spread; the token embedding and the LM head are re-drawn with
    ``embed_std`` so greedy decoding is not tie-bound (Gemma 3 wants less: its embedding is scaled by
    sqrt(d_model)). Parameters whose names end with one of ``widen`` are re-drawn with std 0.5, those
    matching a regular expression of ``redraw`` (``re.search``) with its std. With
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
        elif redraw and (std := next((v for k, v in redraw.items() if re.search(k, name)), None)):
            torch.nn.init.normal_(param, std=std)
        elif redraw_zeros and not param.detach().any():
            torch.nn.init.normal_(param, std=0.1 if param.dim() == 1 else 0.05)
    return model.eval()
