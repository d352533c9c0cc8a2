"""The activation cache :meth:`HookedVLM.run_with_cache` returns: TransformerLens's
``ActivationCache``, exact on models whose weights were not processed.

TransformerLens's residual-stack tools (``accumulated_resid(apply_ln=True)``,
``decompose_resid(apply_ln=True)``, ``stack_head_results(apply_ln=True)``, ``logit_attrs``) divide
each component by the final norm's scale and leave its weight to ``W_U``: right once
``enable_compatibility_mode()`` has folded the weight into ``W_U``, off by that weight (0.7% of the
logit difference on the demo model) on the HF weights HookedVLM runs by default. Here the final
norm's weight is applied too when the stack targets the unembedding, so ``stack @ W_U`` is the exact
contribution to the logits in both modes (after folding the weight is all ones: nothing changes).

Where a family adds more to the stream than attention and MLP outputs, or scales the whole stream
at the end of each layer (Gemma 4's per-layer inputs and ``layer_scalar``: the adapter's
``stream_terms`` and ``stream_scales``), ``decompose_resid`` counts those terms and
``decompose_resid`` and ``stack_head_results`` scale each term by the layers it passes through, so
the terms still sum to the stream; post-sublayer norms (Gemma 2-4, GLM-4.1V's ``ln1_post``) are
applied to each head by their cached scale. TransformerLens's per-neuron decompositions cannot be
made exact there and are refused in one line.

Example:
    >>> logits, cache = vlm.run_with_cache(batch)  # doctest: +SKIP
    >>> stack = cache.decompose_resid(layer=-1)[:, :, -1]  # doctest: +SKIP
    >>> attrs = cache.logit_attrs(stack, tokens, incorrect_tokens, pos_slice=-1)  # doctest: +SKIP
    >>> attrs.sum(0)  # the logit difference, exactly  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Float

from hooked_vllm.model.layers import attention_w_o
from hooked_vllm.model.tl import ActivationCache, Slice

NORMALIZED = ("LN", "LNPre", "RMS", "RMSPre")


def norm_gain(module: torch.nn.Module) -> Float[torch.Tensor, " d_model"] | None:
    """The elementwise gain a norm module multiplies by after normalising, or None if it has no weight:
    ``weight`` (Llama, Gemma 4, GLM, LayerNorm) or ``1 + weight`` (Gemma 1-3, Qwen3.5: the weight
    stored as an offset from one), whichever the module computes. Told apart by running it on
    ``x = 16 * (1, -1, 1, -1, ...)`` and ``-x`` (mean 0, RMS 16: half their outputs' difference is the
    gain times the signs, any bias cancelling)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    signs = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)
    signs[1::2] = -1
    if weight.shape[0] % 2:
        signs[-1] = 0  # keeps the mean 0; that channel is not compared
    with torch.no_grad():
        probe = 16 * signs[None]
        measured = ((module(probe) - module(-probe)) / 2 * signs)[0].float()
        candidates = (weight, 1.0 + weight)
        errors = [((measured - c.float()) * signs.abs()).abs().max() for c in candidates]
    return candidates[int(errors[1] < errors[0])]


def final_norm_weight(bridge: Any) -> Float[torch.Tensor, " d_model"] | None:
    """The elementwise gain the final norm applies after normalising (:func:`norm_gain`), or None."""
    norm = getattr(bridge, "ln_final", None)
    return None if norm is None else norm_gain(getattr(norm, "original_component", norm))


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
        stream_terms: Mapping[int, Mapping[str, str]] | None = None,
        stream_scales: Mapping[int, torch.Tensor] | None = None,
        additive_stream: bool = True,
    ) -> None:
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        #: whether each layer's output is its input stream plus its terms (the adapter's ``additive_stream``)
        self.additive_stream = additive_stream
        #: ``{layer: {label: hook name}}``: what layers add to the stream besides attention and MLP
        #: (the adapter's ``stream_terms``: Gemma 4's per-layer inputs)
        self.stream_terms = {int(k): dict(v) for k, v in (stream_terms or {}).items()}
        #: ``{layer: scale}``: the whole stream multiplied at the layer's end (Gemma 4's ``layer_scalar``)
        self.stream_scales = dict(stream_scales or {})
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

    def _check_additive(self, method: str) -> None:
        """Refuse a decomposition where layers mix several streams (the adapter's ``additive_stream``)."""
        if not self.additive_stream:
            raise NotImplementedError(
                f"{method}: this model's layers mix several residual streams (Gemma 3n's AltUp), so no sum "
                "of layer outputs is its stream: read the stream itself (cache['resid_post', l], "
                "accumulated_resid) or patch it (run_with_hooks)."
            )

    def _terms_before(self, layer: int) -> list[tuple[int, str, str]]:
        """``(layer, label, hook name)`` of the stream terms added in the layers before ``layer``; each
        must be cached, or a decomposition would silently miss it."""
        terms = [
            (n, label, hook)
            for n in sorted(self.stream_terms)
            if n < layer
            for label, hook in self.stream_terms[n].items()
        ]
        missing = [hook for _, _, hook in terms if hook not in self.cache_dict]
        if missing:
            raise ValueError(
                f"{missing[0]} is not in the cache, but it is added to the residual stream there: the "
                "decomposition would not sum to the stream. Cache it too (names_filter)."
            )
        return terms

    @staticmethod
    def _term_start(label: str) -> int:
        """The first layer whose stream scale a term multiplies: 0 for the embeddings, l for a term
        added inside block l, l + 1 for a DeepStack injection (added after block l)."""
        head = label.split("_")[0]
        if not head.isdigit():
            return 0
        return int(head) + 1 if label.endswith("_deepstack") else int(head)

    def _stream_factor(self, start: int, stop: int) -> torch.Tensor | float:
        """The product of the stream scales of layers ``start`` to ``stop - 1``: what a term added in
        layer ``start`` is multiplied by before the stream that layer ``stop`` reads."""
        factor: torch.Tensor | float = 1.0
        for n in range(start, stop):
            if n in self.stream_scales:
                factor = factor * self.stream_scales[n].detach()
        return factor

    @staticmethod
    def _on(factor: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
        return factor.to(like.device, like.dtype) if isinstance(factor, torch.Tensor) else factor

    def _stream(self, layer: int) -> torch.Tensor:
        """The residual stream that block ``layer`` reads (``n_layers``: the final one)."""
        n_layers = self.model.cfg.n_layers
        return self[
            f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"
        ]

    def _norm_scale(self, prefix: str, stream: str | None = None) -> torch.Tensor:
        """``[..., pos, 1]``: what the RMS norm ``prefix`` (``ln_final``, ``blocks.{l}.ln1_post``)
        divided its input by, ``{prefix}.hook_scale`` where transformer-lens gives one, else measured
        from its cached input (``{prefix}.hook_in``, or ``stream``) and the module itself:
        ``sum(gain * x^2) / sum(x * norm(x))``, which is the norm's ``sqrt(mean(x^2) + eps)``."""
        if f"{prefix}.hook_scale" in self.cache_dict:
            return self.cache_dict[f"{prefix}.hook_scale"]
        source = next((name for name in (f"{prefix}.hook_in", stream) if name in self.cache_dict), None)
        if source is None:
            raise ValueError(
                f"{prefix}.hook_in is not in the cache, and this model's norm there has no hook_scale: "
                f"the decomposition needs the stream that norm reads. Cache {prefix}.hook_in (names_filter)."
            )
        module = self.model
        for part in prefix.split("."):
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        module = getattr(module, "original_component", module)
        x = self.cache_dict[source]
        gain = norm_gain(module)
        with torch.no_grad():
            normed = module(x.to(module.weight.dtype) if gain is not None else x).to(x.dtype)
        gain = 1.0 if gain is None else gain.detach().to(x.device, x.dtype)
        numerator = (gain * x * x).sum(-1, keepdim=True)
        denominator = (x * normed).sum(-1, keepdim=True)
        return torch.where(denominator == 0, torch.ones_like(denominator), numerator / denominator)

    def _get_cached_ln_scale(
        self, layer: int | None, mlp_input: bool, pos_slice: Slice, batch_slice: Any = None
    ) -> Any:
        """transformer-lens's cached norm scale; measured (:meth:`_norm_scale`) where the bridge's norm
        has no ``hook_scale`` (Gemma 4's norms are bare modules in transformer-lens 4.3)."""
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == n_layers:
            prefix, stream = "ln_final", f"blocks.{n_layers - 1}.hook_resid_post"
        else:
            prefix = f"blocks.{layer}.ln{2 if mlp_input else 1}"
            stream = f"blocks.{layer}.hook_resid_{'mid' if mlp_input else 'pre'}"
        if f"{prefix}.hook_scale" in self.cache_dict or self.model.cfg.normalization_type not in (
            "RMS",
            "RMSPre",
        ):
            return super()._get_cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)
        scale = pos_slice.apply(self._norm_scale(prefix, stream), dim=-2)
        if batch_slice is not None and self.has_batch_dim:
            scale = batch_slice.apply(scale)
        return scale

    def _not_per_neuron(self) -> str | None:
        """Why TransformerLens's per-head and per-neuron terms (``W_O``, ``W_out`` products) are not
        this model's contributions to the stream, or None."""
        if self.stream_scales or self.stream_terms:
            return (
                "scales the residual stream at the end of its layers or adds terms beside attention and MLP"
            )
        norms = [
            f"blocks.{n}.{name}"
            for n, block in enumerate(self.model.blocks)
            for name in ("ln1_post", "ln2_post")
            if getattr(block, name, None) is not None
        ]
        if norms:
            return f"normalises its sublayers' outputs ({norms[0]}, ...)"
        return None

    def stack_neuron_results(self, layer: int, *args: Any, **kwargs: Any) -> Any:
        """TransformerLens's per-neuron stack; refused where neurons' ``W_out`` products are not what
        reaches the stream (post-sublayer norms, stream scales): use :meth:`decompose_resid`."""
        self._check_additive("stack_neuron_results")
        why = self._not_per_neuron()
        if why is not None:
            raise NotImplementedError(
                f"stack_neuron_results: this model {why}, so a neuron's W_out product is not its "
                "contribution to the residual stream: use decompose_resid (each layer's MLP term)."
            )
        return super().stack_neuron_results(layer, *args, **kwargs)

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Any = None,
        apply_ln: bool = False,
    ) -> Any:
        """TransformerLens's ``stack_head_results``: head ``L{l}H{h}``'s contribution to the stream
        that block ``layer`` reads, ``z @ W_O`` of that head (each layer's own head size, where
        transformer-lens refuses Gemma 4's wider full-attention heads). Where a norm follows the
        attention (``ln1_post``: Gemma 2-4, GLM-4.1V) each head's result goes through it as the sum
        did (its gain over the norm's scale on the sum), and where layers scale the whole stream
        (Gemma 4) each head is multiplied by the scales of its layer and the later ones before
        ``layer``, so the heads sum to the attention terms :meth:`decompose_resid` gives."""
        self._check_additive("stack_head_results")
        post = {
            n for n, block in enumerate(self.model.blocks) if getattr(block, "ln1_post", None) is not None
        }
        if not post and not self.stream_scales:
            return super().stack_head_results(layer, return_labels, incl_remainder, pos_slice, apply_ln)
        slicer = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        last = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        parts, labels = [], []
        for n in range(last):
            heads = slicer.apply(self._head_results(n), dim=-3)  # [..., pos, head, d_model]
            if n in post:
                gain = norm_gain(self.model.blocks[n].ln1_post.original_component)
                scale = slicer.apply(self._norm_scale(f"blocks.{n}.ln1_post"), dim=-2)[..., None, :]
                heads = heads / scale.to(heads.dtype)
                heads = heads if gain is None else heads * gain.detach().to(heads.device, heads.dtype)
            parts.append(heads * self._on(self._stream_factor(n, last), heads))
            labels.extend(f"L{n}H{h}" for h in range(heads.shape[-2]))
        stream = slicer.apply(self._stream(last), dim=-2)
        components = (
            torch.cat(parts, dim=-2).movedim(-2, 0) if parts else stream.new_zeros((0, *stream.shape))
        )
        if incl_remainder:
            components = torch.cat([components, (stream - components.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            components = self.apply_ln_to_stack(components, last, pos_slice=slicer)
        return (components, labels) if return_labels else components

    def _head_results(self, layer: int) -> Float[torch.Tensor, "... pos head d_model"]:
        """Each head's ``z @ W_O`` at ``layer``: the cached ``attn.hook_result`` if there is one, else
        from the cached ``hook_z`` and the layer's own ``W_O``."""
        cached = self.cache_dict.get(f"blocks.{layer}.attn.hook_result")
        if isinstance(cached, torch.Tensor) and cached.dim() == (4 if self.has_batch_dim else 3):
            return cached
        z = self[f"blocks.{layer}.attn.hook_z"]
        w_o = attention_w_o(self.model.blocks[layer].attn).detach().to(z.device, z.dtype)
        return torch.einsum("...hd,hdm->...hm", z, w_o)

    def get_full_resid_decomposition(
        self, layer: int | None = None, mlp_input: bool = False, *args: Any, **kwargs: Any
    ) -> Any:
        """TransformerLens's per-head decomposition; refused where visual features are added to the
        stream between blocks (it has no term for them): use :meth:`decompose_resid`, which counts them.
        In a parallel block ``mlp_input=True`` is the attention's input (see :meth:`decompose_resid`)."""
        self._check_additive("get_full_resid_decomposition")
        last = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        if self._injections_before(last):
            raise NotImplementedError(
                "get_full_resid_decomposition has no term for the visual features this model adds to the "
                "residual stream (blocks.{l}.hook_deepstack): use decompose_resid, which counts them."
            )
        why = self._not_per_neuron()
        if why is not None:
            raise NotImplementedError(
                f"get_full_resid_decomposition: this model {why}, which its W_O and W_out products do not "
                "count (they would not sum to the stream): use decompose_resid and stack_head_results."
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
        if apply_ln and not self.additive_stream:
            raise NotImplementedError(
                "accumulated_resid(apply_ln=True): this model's final norm reads the average of its several "
                "residual streams (Gemma 3n's AltUp), not resid_post: for the logit lens use "
                "lens_stack_from_cache(LogitLens.from_vlm(vlm), cache, positions)."
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
        ``mlp_input=True`` decomposes that same stream (no ``{layer}_attn_out`` term, ``ln1``'s scale).
        What a layer adds besides (the adapter's ``stream_terms``: Gemma 4's per-layer inputs) is the
        term ``"{l}_{label}"`` (``"{l}_per_layer_input"``) with ``mode="all"``; where layers scale the
        whole stream at their end (``stream_scales``: Gemma 4's ``layer_scalar``), every term is
        multiplied by the scales of the layers it passes through before ``layer``."""
        self._check_additive("decompose_resid")
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
        terms = self._terms_before(last) if mode == "all" else []
        if injected or terms:
            slicer = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
            parts, names = list(components), list(labels)
            added = [(n, f"{n}_{label}", hook) for n, label, hook in terms]
            added += [(n, f"{n}_deepstack", f"blocks.{n}.hook_deepstack") for n in injected]
            for n, name, hook in sorted(added, key=lambda term: term[0]):  # a layer's terms, then DeepStack
                mine = [i for i, label in enumerate(names) if label.split("_")[0] == str(n)]
                at = mine[-1] + 1 if mine else len(names)
                parts.insert(at, slicer.apply(self[hook], dim=-2))
                names.insert(at, name)
            components, labels = torch.stack(parts), names
        if self.stream_scales:
            factors = [self._stream_factor(self._term_start(label), last) for label in labels]
            components = torch.stack(
                [part * self._on(factor, part) for part, factor in zip(components, factors)]
            )
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
        *,
        stream_terms: Mapping[int, Mapping[str, str]] | None = None,
        stream_scales: Mapping[int, torch.Tensor] | None = None,
        additive_stream: bool = True,
        mixer: str = "linear_attn",
    ) -> None:
        """``points``: ``{name: HookPoint}`` to record (aliases of one point are recorded once); the
        rest is handed to the :class:`VLMActivationCache` (the adapter's stream layout)."""
        self.names: dict[int, list[str]] = {}
        self.points: dict[int, Any] = {}
        for name, point in points.items():
            self.names.setdefault(id(point), []).append(name)
            self.points[id(point)] = point
        self.steps: dict[int, list[torch.Tensor]] = {key: [] for key in self.points}
        self.device = device
        self.injection_layers = tuple(injection_layers)
        self.stream_terms, self.stream_scales = stream_terms, stream_scales
        self.additive_stream = additive_stream
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
            joined,
            bridge,
            has_batch_dim=True,
            injection_layers=self.injection_layers,
            mixer=self.mixer,
            stream_terms=self.stream_terms,
            stream_scales=self.stream_scales,
            additive_stream=self.additive_stream,
        )
