"""InstructBLIP (``InstructBlipForConditionalGeneration``) with a decoder-only (LLaMA/Vicuna) backbone:
EVA ViT -> Q-Former (which also reads the instruction) -> linear projection -> LLaMA.

The processor prepends ``num_query_tokens`` image placeholders *before* BOS; the projected
Q-Former query outputs replace them. Flan-T5 backbones (encoder-decoder) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from PIL import Image
from transformers import PretrainedConfig, PreTrainedModel

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter
from hooked_vllm.adapters.tokens import token_ids_with_spans
from hooked_vllm.errors import UnsupportedModelError


class InstructBlipAdapter(VLMAdapter):
    family = "instructblip"
    architectures = ("InstructBlipForConditionalGeneration",)
    vision_input_names = ("qformer_input_ids", "qformer_attention_mask")

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        if not getattr(config, "use_decoder_only_language_model", True):
            raise UnsupportedModelError(
                f"InstructBLIP with a {config.text_config.model_type!r} (encoder-decoder) backbone is "
                "not supported: hooked-vllm wraps decoder-only language models. Use a Vicuna/LLaMA "
                "variant such as Salesforce/instructblip-vicuna-7b."
            )

    def language_model(self) -> PreTrainedModel:
        lm = self.hf_model.language_model
        lm.config.architectures = [type(lm).__name__]
        return lm

    @property
    def text_config(self) -> PretrainedConfig:
        return self.hf_model.config.text_config

    @property
    def image_token_id(self) -> int:
        return int(self.hf_model.config.image_token_index)

    @property
    def n_query_tokens(self) -> int:
        return int(self.hf_model.config.num_query_tokens)

    def format_prompt(self, instruction: str, n_images: int) -> tuple[str, tuple[int, int]]:
        return instruction, (0, len(instruction))

    def count_image_slots(self, prompt: str) -> int:
        return 1

    def process(
        self, images: Sequence[Image.Image], prompts: Sequence[str], padding_side: str
    ) -> Mapping[str, torch.Tensor]:
        return self.processor(
            images=list(images),
            text=list(prompts),
            return_tensors="pt",
            padding=True,
            padding_side=padding_side,
        )

    def normalize_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move the Q-Former text's padding to the right.

        The processor hands one set of text options (the LM tokenizer's padding side included) to
        both tokenizers, but the Q-Former's BERT encoder has absolute position embeddings: left
        padding would shift them with the batch-mates' lengths.
        """
        mask = inputs.get("qformer_attention_mask")
        if mask is None or bool(mask[:, 0].all()):
            return inputs
        order = torch.argsort(1 - mask.long(), dim=1, stable=True)  # real tokens first, in order
        return {
            **inputs,
            "qformer_input_ids": inputs["qformer_input_ids"].gather(1, order),
            "qformer_attention_mask": mask.gather(1, order),
        }

    def prompt_token_ids(self, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, spans = token_ids_with_spans(self.tokenizer, prompt)
        return [self.image_token_id] + ids, [(0, 0)] + spans

    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        return self.hf_model.get_image_features(
            pixel_values=inputs["pixel_values"],
            qformer_input_ids=inputs["qformer_input_ids"],
            qformer_attention_mask=inputs.get("qformer_attention_mask"),
        ).pooler_output.flatten(0, 1)

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """The Q-Former's query outputs: slots that are not patches (no place on the image)."""
        n = self.n_query_tokens
        query = torch.arange(n)
        return [ImageSlots(torch.stack([0 * query, 0 * query, query], -1), spatial=False)] * self.n_images(
            inputs
        )

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        sites = {
            f"vision.blocks.{i}.hook_resid_post": layer
            for i, layer in enumerate(self.hf_model.vision_model.encoder.layers)
        }
        for i, layer in enumerate(self.hf_model.qformer.encoder.layer):
            sites[f"qformer.blocks.{i}.hook_resid_post"] = layer
        return sites
