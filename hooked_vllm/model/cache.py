"""The activation cache :meth:`HookedVLM.run_with_cache` returns: TransformerLens's
``ActivationCache``, exact on models whose weights were not processed.

TransformerLens's residual-stack tools (``accumulated_resid(apply_ln=True)``,
``decompose_resid(apply_ln=True)``, ``stack_head_results(apply_ln=True)``, ``logit_attrs``) divide
each component by the final norm's scale and leave its weight to ``W_U``: right once
``enable_compatibility_mode()`` has folded the weight into ``W_U``, off by that weight (0.7% of the
logit difference on the demo model) on the HF weights HookedVLM runs by default. Here the final
norm's weight is applied too when the stack targets the unembedding, so ``stack @ W_U`` is the exact
contribution to the logits in both modes (after folding the weight is all ones: nothing changes).

Example:
    >>> logits, cache = vlm.run_with_cache(batch)  # doctest: +SKIP
    >>> stack = cache.decompose_resid(layer=-1)[:, :, -1]  # doctest: +SKIP
    >>> attrs = cache.logit_attrs(stack, tokens, incorrect_tokens, pos_slice=-1)  # doctest: +SKIP
    >>> attrs.sum(0)  # the logit difference, exactly  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

from hooked_vllm.model.tl import ActivationCache, Slice

NORMALIZED = ("LN", "LNPre", "RMS", "RMSPre")


def final_norm_weight(bridge: Any) -> Float[torch.Tensor, " d_model"] | None:
    """The elementwise scale the final norm applies after normalising, or None if it has none.

    Gemma-style RMSNorms scale by ``1 + weight`` (their weight is stored as an offset from one).
    """
    norm = getattr(bridge, "ln_final", None)
    module = getattr(norm, "original_component", norm)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if "gemma" in type(module).__name__.lower():
        return 1.0 + weight
    return weight


class VLMActivationCache(ActivationCache):
    """``ActivationCache`` whose stacks aimed at the unembedding include the final norm's weight, and
    whose residual decompositions count the visual features some families add to the stream between
    blocks (Qwen3-VL's DeepStack, ``blocks.{l}.hook_deepstack``) as terms of their own."""

    def __init__(
        self,
        cache_dict: dict,
        model: Any,
        has_batch_dim: bool = True,
        injection_layers: tuple[int, ...] = (),
        mixer: str = "linear_attn",
    ) -> None:
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        #: layers after which the family adds visual features to the stream (Qwen3-VL's DeepStack)
        self.injection_layers = tuple(injection_layers)
        #: the token mixer of layers with no attention pattern (``adapter.mixer_without_pattern``)
        self.mixer = mixer

    def _injections_before(self, layer: int) -> list[int]:
        """The injection layers whose features are in the stream at ``resid_pre`` of ``layer``; each
        must be cached, or a decomposition would silently miss it."""
        known = set(self.injection_layers) | {
            int(name.split(".")[1]) for name in self.cache_dict if name.endswith(".hook_deepstack")
        }
        injected = sorted(n for n in known if n < layer)
        missing = [n for n in injected if f"blocks.{n}.hook_deepstack" not in self.cache_dict]
        if missing:
            raise ValueError(
                f"blocks.{missing[0]}.hook_deepstack is not in the cache, but it is added to the residual "
                "stream there: the decomposition would not sum to the stream. Cache it too (names_filter)."
            )
        return injected

    def get_full_resid_decomposition(
        self, layer: int | None = None, mlp_input: bool = False, *args: Any, **kwargs: Any
    ) -> Any:
        """TransformerLens's per-head decomposition; refused where visual features are added to the
        stream between blocks (it has no term for them): use :meth:`decompose_resid`, which counts them.
        In a parallel block ``mlp_input=True`` is the attention's input (see :meth:`decompose_resid`)."""
        last = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        if self._injections_before(last):
            raise NotImplementedError(
                "get_full_resid_decomposition has no term for the visual features this model adds to the "
                "residual stream (blocks.{l}.hook_deepstack): use decompose_resid, which counts them."
            )
        mlp_input = mlp_input and not self._parallel
        return super().get_full_resid_decomposition(layer, mlp_input, *args, **kwargs)

    @property
    def _parallel(self) -> bool:
        """Whether each block runs attention and MLP in parallel on one norm's output (Cohere's), so
        that there is no ``hook_resid_mid`` and the MLP's input is the block's ``resid_pre``."""
        return bool(getattr(self.model.cfg, "parallel_attn_mlp", False))

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: Any = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Any:
        """TransformerLens's ``accumulated_resid``. In a parallel block (``cfg.parallel_attn_mlp``) the
        MLP's input is ``resid_pre`` (``mlp_input=True`` gives that), and there is no ``resid_mid``."""
        if self._parallel and incl_mid:
            raise ValueError(
                "This model's blocks run attention and the MLP in parallel on one norm's output "
                "(cfg.parallel_attn_mlp): there is no resid_mid between them. Use incl_mid=False."
            )
        mlp_input = mlp_input and not self._parallel
        return super().accumulated_resid(layer, incl_mid, apply_ln, pos_slice, mlp_input, return_labels)

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: Any = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Any:
        """TransformerLens's ``decompose_resid``; with ``mode="all"`` an injection after block l is
        the term ``"{l}_deepstack"`` (after ``"{l}_mlp_out"``), so the terms still sum to the stream.
        A layer whose token mixer has no attention (Qwen3.5's Gated DeltaNet, no ``hook_attn_out``)
        contributes its mixer's output, ``blocks.{l}.linear_attn.hook_out``, as ``"{l}_linear_attn_out"``
        (LFM2's short convolution: ``blocks.{l}.conv.hook_out``, ``"{l}_conv_out"``).
        The MLP term ``"{l}_mlp_out"`` of a mixture-of-experts layer is the whole block's output: the
        routed experts' sum plus any shared expert. In a parallel block (``cfg.parallel_attn_mlp``:
        Cohere's one norm feeding attention and MLP) the MLP reads ``resid_pre`` as attention does, so
        ``mlp_input=True`` decomposes that same stream (no ``{layer}_attn_out`` term, ``ln1``'s scale)."""
        mlp_input = mlp_input and not self._parallel
        mixers = {
            f"blocks.{n}.hook_attn_out": f"blocks.{n}.{self.mixer}.hook_out"
            for n in range(self.model.cfg.n_layers)
            if f"blocks.{n}.hook_attn_out" not in self.cache_dict
            and f"blocks.{n}.{self.mixer}.hook_out" in self.cache_dict
        }
        self.cache_dict.update({attn: self.cache_dict[linear] for attn, linear in mixers.items()})
        try:
            components, labels = super().decompose_resid(
                layer, mlp_input, mode, False, pos_slice, incl_embeds, return_labels=True
            )
        finally:
            for attn in mixers:
                del self.cache_dict[attn]
        renamed = {f"{attn.split('.')[1]}_attn_out" for attn in mixers}
        labels = [
            label.replace("_attn_out", f"_{self.mixer}_out") if label in renamed else label
            for label in labels
        ]
        last = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        injected = self._injections_before(last) if mode == "all" else []
        if injected:
            slicer = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
            parts, names = list(components), list(labels)
            for n in injected:
                at = names.index(f"{n}_mlp_out") + 1 if f"{n}_mlp_out" in names else len(names)
                parts.insert(at, slicer.apply(self[f"blocks.{n}.hook_deepstack"], dim=-2))
                names.insert(at, f"{n}_deepstack")
            components, labels = torch.stack(parts), names
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (components, labels) if return_labels else components

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Any = None,
        batch_slice: Any = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        mlp_input = mlp_input and not self._parallel  # a parallel block's MLP reads ln1's output
        scaled = super().apply_ln_to_stack(
            residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln
        )
        to_unembed = layer is None or layer == -1 or layer == self.model.cfg.n_layers
        if not to_unembed or recompute_ln or self.model.cfg.normalization_type not in NORMALIZED:
            return scaled  # recompute_ln runs the norm module itself, weight included
        weight = final_norm_weight(self.model)
        return scaled if weight is None else scaled * weight.to(scaled.device, scaled.dtype)


class GenerationRecorder:
    """Caching hooks for cached generation: every forward (the prompt, then one position per
    decoding step) is recorded, and :meth:`cache` joins them along the position axis.

    The result is what one forward over the prompt plus the generated tokens but the last (which
    no forward ever reads) would cache: per-position activations ``[batch, pos, ...]`` concatenated;
    attention patterns and scores ``[batch, head, query, key]`` concatenated over queries, each
    step's row padded over the keys it could not yet see (pattern 0, scores as the model masks
    them). Hooks that fire on the prompt only (the vision side, ``hook_visual_prefix``) keep their
    single tensor.
    """

    QUERY_KEY = ("hook_pattern", "hook_attn_scores")

    def __init__(
        self,
        points: dict[str, Any],
        device: str | torch.device | None = None,
        injection_layers: tuple[int, ...] = (),
        mixer: str = "linear_attn",
    ) -> None:
        """``points``: ``{name: HookPoint}`` to record (aliases of one point are recorded once)."""
        self.names: dict[int, list[str]] = {}
        self.points: dict[int, Any] = {}
        for name, point in points.items():
            self.names.setdefault(id(point), []).append(name)
            self.points[id(point)] = point
        self.steps: dict[int, list[torch.Tensor]] = {key: [] for key in self.points}
        self.device = device
        self.injection_layers = tuple(injection_layers)
        self.mixer = mixer

    def hooks(self) -> list[tuple[str, Any]]:
        def recorder(key: int) -> Any:
            def record(activation: torch.Tensor, hook: Any) -> None:
                kept = activation.detach()
                self.steps[key].append(kept.to(self.device) if self.device is not None else kept)

            return record

        return [(self.names[key][0], recorder(key)) for key in self.points]

    def cache(self, bridge: Any) -> VLMActivationCache:
        joined: dict[str, torch.Tensor] = {}
        for key, tensors in self.steps.items():
            name = self.names[key][0]
            if not tensors:
                continue
            if len(tensors) == 1:
                joined[name] = tensors[0]
            elif name.endswith(self.QUERY_KEY):
                keys = tensors[-1].shape[-1]
                fill = 0.0 if name.endswith("hook_pattern") else torch.finfo(tensors[0].dtype).min
                padded = [torch.nn.functional.pad(t, (0, keys - t.shape[-1]), value=fill) for t in tensors]
                joined[name] = torch.cat(padded, dim=2)
            else:
                joined[name] = torch.cat(tensors, dim=1)
            for alias in self.names[key][1:]:
                joined[alias] = joined[name]
        return VLMActivationCache(
            joined, bridge, has_batch_dim=True, injection_layers=self.injection_layers, mixer=self.mixer
        )
