"""Sparse autoencoders spliced into a HookedVLM, in the style of SAELens's ``HookedSAETransformer``.

SAELens (the field's SAE library) does not import with transformer-lens 4, so this module carries
what a HookedVLM user needs from it:

- :class:`SAE`: standard (ReLU), top-k and JumpReLU SAEs with SAELens's ``encode``/``decode``/
  ``forward`` and its folder format (``cfg.json`` + ``sae_weights.safetensors``, read and written
  by :meth:`SAE.load_from_disk` / :meth:`SAE.save_to_disk`);
- :func:`vlm_saes` (a context manager), :func:`run_with_saes` and :func:`run_with_cache_with_saes`:
  while spliced, the activation at the SAE's hook point is replaced by the SAE's output, and the
  SAE's hook points are known to the VLM as ``{hook_name}.hook_sae_input``, ``.hook_sae_acts_pre``,
  ``.hook_sae_acts_post``, ``.hook_sae_recons``, ``.hook_sae_error`` and ``.hook_sae_output``
  (cache them, hook them by name, as with SAELens).

Any object with ``encode``, ``decode`` and a hook name (``cfg.metadata.hook_name``,
``cfg.hook_name`` or ``hook_name``) can be spliced too (a SAELens SAE, your own class).

``{hook_name}`` itself carries the spliced activation for hooks added inside the context (they run
after the SAE); the clean activation is ``{hook_name}.hook_sae_input``.

Example:
    >>> from hooked_vllm.model.sae import SAE, run_with_cache_with_saes
    >>> sae = SAE.load_from_disk("saes/llava-l10-resid")  # doctest: +SKIP
    >>> logits, cache = run_with_cache_with_saes(
    ...     vlm, batch, saes=[sae], use_error_term=True,
    ...     names_filter=lambda n: n.endswith("hook_sae_acts_post"))  # doctest: +SKIP
    >>> cache[f"{sae.cfg.hook_name}.hook_sae_acts_post"][batch.image_mask].shape  # doctest: +SKIP
    torch.Size([576, 16384])
"""

from __future__ import annotations

import contextlib
import difflib
import json
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float
from safetensors.torch import load_file, save_file
from torch import nn

from hooked_vllm.errors import HookedVLMError
from hooked_vllm.model.tl import HookPoint

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
#: the SAE's hook points, registered on the VLM as ``f"{hook_name}.{suffix}"``
SAE_HOOK_SUFFIXES = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_output",
    "hook_sae_recons",
    "hook_sae_error",
)
_DTYPES = {
    name: dtype
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for name in (str(dtype), str(dtype).removeprefix("torch."))
}


class SAEHost(Protocol):
    """What splicing needs of a model: its hook points and its forward (a HookedVLM is one)."""

    bridge: Any

    @property
    def hook_dict(self) -> Mapping[str, HookPoint]: ...

    def add_hook_point(self, name: str, point: HookPoint) -> HookPoint: ...

    def remove_hook_point(self, name: str) -> None: ...

    def to_batch(self, batch: Any) -> Any: ...

    def forward(self, batch: Any, **kwargs: Any) -> Any: ...

    def run_with_cache(self, batch: Any, **kwargs: Any) -> Any: ...


class SAEError(HookedVLMError):
    """An SAE cannot be loaded or spliced: unknown format or hook name, mismatched width."""


# ---------------------------------------------------------------------------------------- config
@dataclass
class SAEConfig:
    """What SAELens's ``cfg.json`` says about an SAE (the fields inference needs).

    ``k`` and ``rescale_acts_by_decoder_norm`` apply to top-k SAEs. ``metadata`` keeps SAELens's
    metadata (``model_name``, ``neuronpedia_id``...) so that a loaded SAE saves back unchanged.
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEError(
                f"SAE architecture {self.architecture!r} is not supported; hooked-vllm runs "
                f"{', '.join(ARCHITECTURES)}. Convert the SAE to one of them (or splice your own object "
                "with encode/decode)."
            )
        if self.architecture == "topk" and (not isinstance(self.k, int) or not 0 < self.k <= self.d_sae):
            raise SAEError(
                f"A top-k SAE needs an integer k in [1, d_sae={self.d_sae}]; got k={self.k!r}. Set 'k' in "
                "cfg.json (SAELens 6) or activation_fn_kwargs.k (older SAELens)."
            )
        if self.normalize_activations != "none":
            raise SAEError(
                f"normalize_activations={self.normalize_activations!r} is not supported (only 'none'). "
                "Fold the scaling into the weights first (SAELens: sae.fold_activation_norm_scaling_factor"
                "(factor)), then save with normalize_activations='none'."
            )
        if self.reshape_activations not in ("none", "hook_z"):
            raise SAEError(
                f"reshape_activations={self.reshape_activations!r} is not supported: use 'none' or 'hook_z'."
            )
        if self.dtype not in _DTYPES:
            raise SAEError(f"SAE dtype {self.dtype!r} is not one of {sorted(_DTYPES)}.")
        if not self.hook_name:
            raise SAEError("The SAE has no hook name: set cfg.hook_name (e.g. 'blocks.10.hook_resid_post').")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SAEConfig:
        """Read a SAELens ``cfg.json`` dict: SAELens 6 (hook name in ``metadata``) or older
        (``hook_name``/``hook_point`` at the top, ``activation_fn[_str]`` with ``activation_fn_kwargs``),
        as SAELens's own loader reads them."""
        raw = dict(raw)
        metadata = dict(raw.get("metadata") or {})
        hook_name = metadata.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
        head_index = metadata.get(
            "hook_head_index", raw.get("hook_head_index", raw.get("hook_point_head_index"))
        )
        if head_index is not None:
            raise SAEError(
                f"The SAE reads one attention head (hook_head_index={head_index}); hooked-vllm splices SAEs "
                "over whole hook points only."
            )
        activation = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
        kwargs = raw.get("activation_fn_kwargs") or {}
        architecture = raw.get("architecture", "standard")
        k = raw.get("k")
        if activation == "topk" and kwargs.get("k") is not None:  # SAELens < 6 wrote top-k this way
            architecture, k = "topk", kwargs["k"]
        elif activation not in ("relu", "topk", None):
            raise SAEError(
                f"SAE activation {activation!r} is not supported (only relu, topk and jumprelu SAEs are)."
            )
        normalize = raw.get("normalize_activations", "none")
        if normalize is None or normalize is False:
            normalize = "none"
        elif normalize is True:
            normalize = "expected_average_only_in"
        reshape = raw.get("reshape_activations") or ("hook_z" if "hook_z" in (hook_name or "") else "none")
        metadata.update({key: raw[key] for key in ("model_name", "neuronpedia_id") if key in raw})
        try:
            return cls(
                architecture=architecture,
                d_in=int(raw["d_in"]),
                d_sae=int(raw["d_sae"]),
                hook_name=hook_name,
                k=k,
                rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
                apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                normalize_activations=normalize,
                reshape_activations=reshape,
                dtype=str(raw.get("dtype", "float32")),
                device=str(raw.get("device", "cpu")),
                metadata=metadata,
            )
        except KeyError as exc:
            raise SAEError(
                f"The SAE config lacks {exc.args[0]!r}; SAELens's cfg.json has d_in and d_sae."
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """SAELens 6's ``cfg.json`` layout (hook name in ``metadata``), plus ``hook_name`` at the top
        level, where SAELens before 6 (and SAELens 6 for files without a version) looks for it."""
        out: dict[str, Any] = {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": self.device,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": self.reshape_activations,
            "metadata": {**self.metadata, "hook_name": self.hook_name},
            "architecture": self.architecture,
            "hook_name": self.hook_name,
        }
        if self.architecture == "topk":
            out["k"] = self.k
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        return out


# ---------------------------------------------------------------------------------------- modules
class _SAEBase(nn.Module):
    """The hook points and SAELens's ``forward``: ``decode(encode(x))``, plus, with the error term,
    ``x - decode(encode(x))`` computed without hooks and without gradient (as SAELens does)."""

    use_error_term: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_output = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self._bypass_hooks = False

    @property
    def hook_name(self) -> str:
        raise NotImplementedError

    @property
    def d_in(self) -> int | None:
        return None

    def hook_points(self) -> dict[str, HookPoint]:
        """The SAE's six hook points by suffix (``hook_sae_acts_post``...)."""
        return {suffix: getattr(self, suffix) for suffix in SAE_HOOK_SUFFIXES}

    def _hook(self, suffix: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self._bypass_hooks else getattr(self, suffix)(tensor)

    def _has_hooks(self) -> bool:
        return any(point._forward_hooks for point in self.hook_points().values())

    def forward(
        self, x: Float[torch.Tensor, "... d_in"], use_error_term: bool | None = None
    ) -> Float[torch.Tensor, "... d_in"]:
        """``decode(encode(x))``; with the error term (``use_error_term``, else ``self.use_error_term``)
        plus ``x`` minus the hook-free reconstruction (no gradient flows through it, as in SAELens),
        so that the output is ``x`` itself unless a hook edits features or reconstruction."""
        feature_acts = self.encode(x)
        sae_out = self.decode(feature_acts)
        if self.use_error_term if use_error_term is None else use_error_term:
            with torch.no_grad():
                clean = sae_out.detach()
                if self._has_hooks():  # a hook may have changed what encode/decode gave: redo without
                    self._bypass_hooks = True
                    try:
                        clean = self.decode(self.encode(x))
                    finally:
                        self._bypass_hooks = False
                error = x - clean
                hooked_error = self._hook("hook_sae_error", error)
            if hooked_error is error:  # sae_out + error, summed so that it is exactly x if nothing is edited
                sae_out = x.detach() + (sae_out - clean)
            else:
                sae_out = sae_out + hooked_error
        return self._hook("hook_sae_output", sae_out)


class SAE(_SAEBase):
    """A sparse autoencoder as SAELens defines it (architectures ``standard``, ``topk``, ``jumprelu``).

    With ``x̃ = x - b_dec`` (if ``apply_b_dec_to_input``) and ``pre = x̃ @ W_enc + b_enc``:

    - standard: ``acts = relu(pre)``;
    - topk: the ``k`` largest entries of ``pre`` (times ``‖W_dec‖`` per feature first, with
      ``rescale_acts_by_decoder_norm``) go through a ReLU, the others are 0;
    - jumprelu: ``acts = relu(pre) * (pre > threshold)``;

    and ``decode(acts) = acts @ W_dec + b_dec`` (``acts / ‖W_dec‖`` first for rescaled top-k).
    Weights are initialised as SAELens does (``W_enc = W_dec.T``, Kaiming-uniform; zero biases and
    thresholds); load trained ones with :meth:`load_from_disk`.

    Example:
        >>> import torch
        >>> from hooked_vllm.model.sae import SAE, SAEConfig
        >>> sae = SAE(SAEConfig("topk", d_in=64, d_sae=256, hook_name="blocks.1.hook_resid_post", k=8))
        >>> acts = sae.encode(torch.randn(2, 5, 64))
        >>> acts.shape, int((acts > 0).sum(-1).max()) <= 8
        (torch.Size([2, 5, 256]), True)
    """

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.use_error_term = use_error_term
        factory = {"dtype": _DTYPES[cfg.dtype], "device": cfg.device}
        W_dec = torch.empty(cfg.d_sae, cfg.d_in, **factory)
        nn.init.kaiming_uniform_(W_dec)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **factory))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **factory))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, **factory))
        self._d_head: int | None = None

    @property
    def hook_name(self) -> str:
        return self.cfg.hook_name

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def process_sae_in(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        """Cast to the SAE's dtype, flatten heads (``hook_z`` SAEs), ``hook_sae_input``, minus ``b_dec``."""
        x = x.to(self.dtype)
        if self.cfg.reshape_activations == "hook_z":
            self._d_head = x.shape[-1]
            x = x.flatten(-2)
        x = self._hook("hook_sae_input", x)
        return x - self.b_dec * self.cfg.apply_b_dec_to_input

    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """Feature activations (``hook_sae_acts_pre``, then ``hook_sae_acts_post``)."""
        hidden_pre = self._hook("hook_sae_acts_pre", self.process_sae_in(x) @ self.W_enc + self.b_enc)
        if self.cfg.architecture == "topk":
            if self.cfg.rescale_acts_by_decoder_norm:
                hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
            values, indices = hidden_pre.topk(self.cfg.k, dim=-1, sorted=False)
            acts = torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())
        elif self.cfg.architecture == "jumprelu":
            acts = hidden_pre.relu() * (hidden_pre > self.threshold).to(hidden_pre.dtype)
        else:
            acts = hidden_pre.relu()
        return self._hook("hook_sae_acts_post", acts)

    def decode(self, feature_acts: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        """The reconstruction (``hook_sae_recons``), heads unflattened again for ``hook_z`` SAEs."""
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            feature_acts = feature_acts / self.W_dec.norm(dim=-1)
        recons = self._hook("hook_sae_recons", feature_acts @ self.W_dec + self.b_dec)
        if self.cfg.reshape_activations == "hook_z" and self._d_head is not None:
            recons = recons.unflatten(-1, (-1, self._d_head))
        return recons

    # ------------------------------------------------------------------ disk format
    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(param.shape) for name, param in self.named_parameters()}

    @classmethod
    def load_from_disk(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> SAE:
        """Load a SAELens SAE folder (``cfg.json`` + ``sae_weights.safetensors``; never pickles).

        ``device`` defaults to the CPU (as SAELens's does: the device in ``cfg.json`` is where it was
        trained), ``dtype`` to the one in ``cfg.json``.

        Example:
            >>> sae = SAE.load_from_disk("saes/llava-l10-resid", device="cuda")  # doctest: +SKIP
        """
        path = Path(path)
        cfg_path, weights_path = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
        for needed in (cfg_path, weights_path):
            if not needed.is_file():
                raise SAEError(
                    f"{needed} does not exist: an SAE folder holds {SAE_CFG_FILENAME} and "
                    f"{SAE_WEIGHTS_FILENAME}, as SAELens's save_model and SAE.save_to_disk write them."
                )
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise SAEError(f"{cfg_path} is not valid JSON ({exc}); re-save or re-download the SAE.") from exc
        raw["device"] = str(device if device is not None else "cpu")
        if dtype is not None:
            raw["dtype"] = str(dtype)
        cfg = SAEConfig.from_dict(raw)
        tensors = load_file(weights_path, device="cpu")
        scale = tensors.pop("scaling_factor", None)  # SAELens < 6: all ones unless fine-tuned
        if scale is not None and not torch.equal(scale, torch.ones_like(scale)):
            raise SAEError(
                f"{weights_path} has a fine-tuning scaling_factor that is not all ones; fold it into W_dec "
                "(W_dec * scaling_factor[:, None]) and save again."
            )
        if "log_threshold" in tensors and "threshold" not in tensors:  # a JumpReLU training checkpoint
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        sae = cls(cfg)
        expected = sae._expected_shapes()
        problems = [f"missing {name} {shape}" for name, shape in expected.items() if name not in tensors]
        problems += [f"unexpected {name}" for name in sorted(tensors.keys() - expected.keys())]
        problems += [
            f"{name} is {tuple(tensors[name].shape)}, expected {shape}"
            for name, shape in expected.items()
            if name in tensors and tuple(tensors[name].shape) != shape
        ]
        if problems:
            raise SAEError(
                f"{weights_path} does not match its {cfg.architecture} config (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}): {'; '.join(problems)}. Check that cfg.json belongs to these weights."
            )
        sae.load_state_dict({name: tensor.to(sae.dtype) for name, tensor in tensors.items()})
        return sae

    def save_to_disk(self, path: str | Path) -> Path:
        """Write the SAE as SAELens does (``cfg.json`` + ``sae_weights.safetensors``); returns ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg.to_dict()
        cfg["dtype"], cfg["device"] = str(self.dtype).removeprefix("torch."), str(self.device)
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, path / SAE_WEIGHTS_FILENAME)
        (path / SAE_CFG_FILENAME).write_text(json.dumps(cfg, indent=2))
        return path


class _DuckSAE(_SAEBase):
    """Any object with ``encode``/``decode`` and a hook name, given hook points (``hook_sae_acts_pre``
    does not fire: it lies inside the object's ``encode``)."""

    def __init__(self, sae: Any, hook_name: str) -> None:
        super().__init__()
        self.sae = sae
        self._hook_name = hook_name
        self.use_error_term = bool(getattr(sae, "use_error_term", False))

    @property
    def hook_name(self) -> str:
        return self._hook_name

    @property
    def d_in(self) -> int | None:
        d_in = getattr(getattr(self.sae, "cfg", None), "d_in", None) or getattr(self.sae, "d_in", None)
        return int(d_in) if d_in else None

    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        return self._hook("hook_sae_acts_post", self.sae.encode(self._hook("hook_sae_input", x)))

    def decode(self, feature_acts: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        return self._hook("hook_sae_recons", self.sae.decode(feature_acts))


def _hook_name_of(sae: Any) -> str | None:
    cfg = getattr(sae, "cfg", None)
    metadata = getattr(cfg, "metadata", None)
    candidates = (
        metadata.get("hook_name") if isinstance(metadata, Mapping) else getattr(metadata, "hook_name", None),
        getattr(cfg, "hook_name", None),
        getattr(sae, "hook_name", None),
    )
    return next((name for name in candidates if isinstance(name, str) and name), None)


def as_spliceable(sae: Any) -> _SAEBase:
    """``sae`` itself if it is an :class:`SAE`, else a wrapper giving a duck-typed SAE hook points."""
    if isinstance(sae, _SAEBase):
        return sae
    hook_name = _hook_name_of(sae)
    if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None)) and hook_name):
        raise SAEError(
            f"Cannot splice a {type(sae).__name__}: an SAE needs encode(x), decode(acts) and a hook name "
            "(cfg.metadata.hook_name, cfg.hook_name or .hook_name)."
        )
    return _DuckSAE(sae, hook_name)


# ---------------------------------------------------------------------------------------- splicing
#: hook points of a VLM that carry an SAE now (one SAE per point, whatever name it was given by)
_SPLICED: weakref.WeakKeyDictionary[HookPoint, str] = weakref.WeakKeyDictionary()


class _Splice:
    """The forward hook replacing an activation by the SAE's output (where ``positions`` says)."""

    def __init__(
        self,
        sae: _SAEBase,
        use_error_term: bool,
        positions: Bool[torch.Tensor, "batch pos"] | None,
    ) -> None:
        self.sae, self.use_error_term, self.positions = sae, use_error_term, positions

    def __call__(self, x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        sae, name = self.sae, self.sae.hook_name
        flatten_heads = isinstance(sae, SAE) and sae.cfg.reshape_activations == "hook_z"
        width = x.shape[-2] * x.shape[-1] if flatten_heads and x.dim() >= 2 else x.shape[-1]
        if sae.d_in is not None and width != sae.d_in:
            raise SAEError(
                f"The SAE at {name!r} has d_in={sae.d_in} but the activation there is {list(x.shape)} "
                f"(width {width}). Use an SAE trained on this model's {name}, or splice it at a hook of "
                f"width {sae.d_in}."
            )
        mask = self.positions
        if (
            mask is not None
            and x.dim() >= 2
            and x.shape[0] == mask.shape[0]
            and x.shape[1] == 1 != mask.shape[1]
        ):
            return x  # a generation step: its new token lies beyond the mask
        if mask is not None and (x.dim() < 2 or x.shape[:2] != mask.shape):
            raise SAEError(
                f"positions is {list(mask.shape)} but the activation at {name!r} is {list(x.shape)}: "
                "pass the batch's own [batch, pos] mask (e.g. batch.image_mask), at a hook laid out "
                "[batch, pos, ...]."
            )
        param = next(sae.parameters(), None)
        inputs = x if param is None else x.to(param.device)
        out = sae(inputs, use_error_term=self.use_error_term).to(x.device, x.dtype)
        if mask is not None:
            out = torch.where(mask.to(x.device).view(*mask.shape, *[1] * (x.dim() - 2)), out, x)
        return out


@contextlib.contextmanager
def vlm_saes(
    vlm: SAEHost,
    saes: Any | Sequence[Any],
    use_error_term: bool | None = None,
    positions: Bool[torch.Tensor, "batch pos"] | None = None,
) -> Iterator[SAEHost]:
    """Splice SAEs into ``vlm`` for the duration of the context (as SAELens's ``model.saes(...)``).

    Each SAE's activation is replaced by its output, at every position or only where ``positions``
    (a ``[batch, pos]`` mask such as ``batch.image_mask``) is True; elsewhere, and at tokens
    ``generate`` adds, the clean activation stays. ``use_error_term=True`` adds the SAE's error
    (``x`` minus its reconstruction), so the model computes what it computes without SAEs while the
    features are there to read and edit; ``None`` takes each SAE's own ``use_error_term``. The hook
    names given may be TransformerLens aliases (``blocks.3.hook_resid_pre``); the SAE's hook points
    are registered under that name, ``f"{hook_name}.hook_sae_acts_post"`` etc.

    Example:
        >>> with vlm_saes(vlm, [sae], positions=batch.image_mask):  # doctest: +SKIP
        ...     logits, cache = vlm.run_with_cache(batch, names_filter=lambda n: "hook_sae" in n)
    """
    modules = [as_spliceable(sae) for sae in (saes if isinstance(saes, list | tuple) else [saes])]
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2:
            raise SAEError(
                "positions must be a [batch, pos] boolean mask (e.g. batch.image_mask); "
                f"got {type(positions).__name__}{list(getattr(positions, 'shape', []))}."
            )
        positions = positions.bool()
    hook_dict = vlm.hook_dict
    points = [_hook_point_for(vlm, hook_dict, module.hook_name) for module in modules]
    for i, (module, point) in enumerate(zip(modules, points)):
        taken = _SPLICED.get(point) or next(
            (other.hook_name for other, p in zip(modules[:i], points[:i]) if p is point), None
        )
        if taken is not None:
            raise SAEError(
                f"Two SAEs at one hook point: {taken!r} and {module.hook_name!r} name the same hook point. "
                "Splice one SAE per hook point (exit the context that spliced the other one first)."
            )
    attached: list[tuple[HookPoint, Any]] = []
    registered: list[tuple[str, HookPoint]] = []
    try:
        for module, point in zip(modules, points):
            error_term = module.use_error_term if use_error_term is None else use_error_term
            handle = point.add_hook(_Splice(module, error_term, positions), dir="fwd", is_permanent=True)
            attached.append((point, handle))
            _SPLICED[point] = module.hook_name
            for suffix, sae_point in module.hook_points().items():
                name = f"{module.hook_name}.{suffix}"
                try:
                    vlm.add_hook_point(name, sae_point)
                except KeyError:
                    raise SAEError(
                        f"A hook point named {name!r} exists already; remove it (vlm.remove_hook_point) or "
                        "give the SAE another hook name."
                    ) from None
                registered.append((name, sae_point))
        yield vlm
    finally:
        for name, sae_point in reversed(registered):
            vlm.remove_hook_point(name)
            sae_point.remove_hooks("bwd", including_permanent=True)
        for point, handle in reversed(attached):
            handle.hook.remove()
            point.fwd_hooks = [other for other in point.fwd_hooks if other is not handle]
            _SPLICED.pop(point, None)


def run_with_saes(
    vlm: SAEHost,
    batch: Any,
    saes: Any | Sequence[Any] = (),
    use_error_term: bool | None = None,
    positions: Bool[torch.Tensor, "batch pos"] | str | None = None,
    **kwargs: Any,
) -> Any:
    """One forward with SAEs spliced in (``kwargs`` go to ``vlm.forward``, e.g. ``return_type``).
    ``positions`` may name a modality of ``batch`` (``"image"``, ``"text"``, ``"special"``).

    Example:
        >>> logits = run_with_saes(vlm, batch, saes=[sae], positions="image")  # doctest: +SKIP
    """
    positions = _positions_for(vlm, batch, positions)
    with vlm_saes(vlm, saes, use_error_term=use_error_term, positions=positions):
        return vlm.forward(batch, **kwargs)


def run_with_cache_with_saes(
    vlm: SAEHost,
    batch: Any,
    saes: Any | Sequence[Any] = (),
    use_error_term: bool | None = None,
    positions: Bool[torch.Tensor, "batch pos"] | str | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """``vlm.run_with_cache`` with SAEs spliced in: ``(logits, ActivationCache)``; ``kwargs``
    (``names_filter``, ``device``...) go to ``run_with_cache``.

    Example:
        >>> _, cache = run_with_cache_with_saes(vlm, batch, saes=[sae], use_error_term=True,
        ...     names_filter=f"{sae.cfg.hook_name}.hook_sae_acts_post")  # doctest: +SKIP
    """
    positions = _positions_for(vlm, batch, positions)
    with vlm_saes(vlm, saes, use_error_term=use_error_term, positions=positions):
        return vlm.run_with_cache(batch, **kwargs)


def _positions_for(vlm: SAEHost, batch: Any, positions: Any) -> Any:
    return vlm.to_batch(batch).mask(positions) if isinstance(positions, str) else positions


def _hook_point_for(vlm: SAEHost, hook_dict: Mapping[str, HookPoint], name: str) -> HookPoint:
    point = hook_dict.get(name)
    if point is None:
        close = difflib.get_close_matches(name, list(hook_dict), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise SAEError(
            f"The SAE's hook name {name!r} is no hook point of this model.{hint} Set the SAE's hook name "
            "to one of vlm.hook_dict's names (e.g. 'blocks.1.hook_resid_post')."
        )
    gate = vlm.bridge._gated_hook_reason(point.name or name)
    if gate is not None:
        raise SAEError(
            f"The hook point {name!r} is switched off, so an SAE there would never run; enable it first "
            f"(vlm.set_{gate}(True))."
        )
    return point
