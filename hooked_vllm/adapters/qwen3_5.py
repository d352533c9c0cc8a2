"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): Qwen3-VL's vision side (dynamic resolution, 2x2
merge, interleaved M-RoPE; no DeepStack) on a **hybrid** language model.

- Most layers are **Gated DeltaNet** linear attention (``linear_attn``): a causal depthwise
  convolution over q/k/v, then a gated delta-rule recurrence. They have no attention pattern: their
  block has ``blocks.{l}.linear_attn.*`` hook points (``hook_q``/``hook_k``/``hook_v`` after the
  convolution, ``hook_beta``, ``hook_log_decay``, ``hook_recurrence_out``, ``hook_out``) and no
  ``blocks.{l}.attn``. :attr:`~hooked_vllm.adapters.base.VLMAdapter.attention_layers` names the
  others, which the attention lenses read. HF zeroes padded positions before each of them, so
  padding never enters the recurrence: a left-padded item is its unpadded self.
- Every ``full_attention_interval``-th layer is softmax attention with q/k norms and an output gate
  (``q_proj`` gives the query and a sigmoid gate per head), M-RoPE on a quarter of each head.
- Norms scale by ``1 + w``. The bridge is booted on HF's own ``Qwen3_5ForCausalLM`` around the VLM's
  text model (transformer-lens' ``qwen3_5`` adapter).
- Generation keeps each linear layer's convolution and recurrent state in HF's cache: a
  right-padded item would run its padding into them, so :attr:`decodes_left_padded`.
"""

from __future__ import annotations

from typing import ClassVar

from hooked_vllm.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen3_5Adapter(Qwen2VLAdapter):
    family = "qwen3_5"
    architectures: ClassVar[tuple[str, ...]] = ("Qwen3_5ForConditionalGeneration",)
    view_class = None  # AutoModelForCausalLM: qwen3_5_text -> Qwen3_5ForCausalLM
    min_transformers = "5.23"  # measured on 5.23 only
