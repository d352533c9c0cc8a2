"""SAEs spliced into HookedVLM (hooked_vllm.model.sae): parity with plain hooks, the error term, SAELens's
folder format and formulas, alias hook names, duck-typed SAEs, position masks, and bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from hooked_vllm.errors import HookedVLMError
from hooked_vllm.model.sae import (
    SAE,
    SAE_HOOK_SUFFIXES,
    SAEConfig,
    SAEError,
    run_with_cache_with_saes,
    run_with_saes,
    vlm_saes,
)
from tests.conftest import INSTRUCTIONS, random_images

ARCHITECTURES = ["standard", "topk", "jumprelu"]
RESID = "blocks.1.hook_out"  # canonical name of blocks.1.hook_resid_post
ALIAS = "blocks.1.hook_resid_pre"  # a TransformerLens alias (of blocks.1.hook_in)
D_MODEL = 64  # the tiny models' width (also n_heads * d_head)


def make_sae(architecture: str, hook_name: str, d_in: int = D_MODEL, seed: int = 0, **cfg) -> SAE:
    torch.manual_seed(seed)
    if architecture == "topk":
        cfg.setdefault("k", 8)
    if "hook_z" in hook_name:
        cfg.setdefault("reshape_activations", "hook_z")
    sae = SAE(SAEConfig(architecture, d_in=d_in, d_sae=96, hook_name=hook_name, **cfg))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if architecture == "jumprelu":
            sae.threshold.uniform_(0, 0.3)
    return sae


def reference_acts(architecture: str, weights: dict, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """SAELens's encoders, written out: pre = (x - b_dec) W_enc + b_enc, then the activation."""
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    if architecture == "standard":
        return pre.clamp(min=0)
    if architecture == "jumprelu":
        return torch.where(pre > weights["threshold"], pre, 0).clamp(min=0)
    kth_largest = pre.sort(dim=-1, descending=True).values[..., k - 1 : k]
    return torch.where(pre >= kth_largest, pre, 0).clamp(min=0)


_CLEAN: dict[int, tuple] = {}


def batch_and_clean(vlm):
    """The batch these tests run and its clean logits (computed once per model, while unhooked)."""
    if id(vlm) not in _CLEAN:
        batch = vlm.prepare(random_images(2), INSTRUCTIONS[:2])
        _CLEAN[id(vlm)] = batch, vlm(batch)
    return _CLEAN[id(vlm)]


def batch_of(vlm):
    return batch_and_clean(vlm)[0]


def sae_names_in(vlm) -> list[str]:
    return [name for name in vlm.hook_dict if "hook_sae_" in name]


# ------------------------------------------------------------------ splicing == a plain hook
@pytest.mark.parametrize("hook_name", [RESID, ALIAS])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_spliced_sae_equals_the_sae_applied_by_a_plain_hook(family, architecture, hook_name):
    check_splice_equals_plain_hook(family.vlm, architecture, hook_name)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_hook_z_sae_flattens_heads(llava, architecture):
    """``reshape_activations="hook_z"``: the SAE reads ``[batch, pos, n_heads, d_head]`` flattened."""
    check_splice_equals_plain_hook(llava.vlm, architecture, "blocks.0.attn.hook_z")


def check_splice_equals_plain_hook(vlm, architecture: str, hook_name: str) -> None:
    batch, clean = batch_and_clean(vlm)
    sae = make_sae(architecture, hook_name)
    spliced = run_with_saes(vlm, batch, saes=[sae])
    plain = vlm.run_with_hooks(batch, fwd_hooks=[(hook_name, lambda x, hook: sae(x))])
    torch.testing.assert_close(spliced, plain, rtol=0, atol=1e-6)
    assert (spliced - clean).abs().max() > 1e-2  # the SAE did change the run
    # everything is undone on exit
    assert sae_names_in(vlm) == []
    assert vlm.hook_dict[hook_name].fwd_hooks == []


def test_sae_survives_hooks_and_reset_hooks_inside_its_context(llava):
    vlm = llava.vlm
    batch = batch_of(vlm)
    sae = make_sae("standard", ALIAS)
    spliced = run_with_saes(vlm, batch, saes=sae)
    with vlm_saes(vlm, [sae]):
        with_hooks = vlm.run_with_hooks(batch, fwd_hooks=[(ALIAS, lambda x, hook: None)])
        vlm.reset_hooks()
        after_reset = vlm(batch)
    torch.testing.assert_close(with_hooks, spliced, rtol=0, atol=0)
    torch.testing.assert_close(after_reset, spliced, rtol=0, atol=0)


# ------------------------------------------------------------------ the error term
def test_error_term_keeps_logits_and_caches_the_features(family):
    vlm = family.vlm
    batch = batch_of(vlm)
    sae = make_sae("jumprelu", ALIAS)
    clean_logits, clean_cache = vlm.run_with_cache(batch, names_filter=ALIAS)
    x = clean_cache[ALIAS]
    names = [ALIAS] + [f"{ALIAS}.{suffix}" for suffix in SAE_HOOK_SUFFIXES]
    logits, cache = run_with_cache_with_saes(vlm, batch, saes=[sae], use_error_term=True, names_filter=names)
    torch.testing.assert_close(logits, clean_logits, rtol=0, atol=1e-5)
    acts = cache[f"{ALIAS}.hook_sae_acts_post"]
    weights = dict(sae.named_parameters())
    torch.testing.assert_close(acts, reference_acts("jumprelu", weights, x), rtol=0, atol=1e-5)
    torch.testing.assert_close(acts, sae.encode(x), rtol=0, atol=0)
    assert 0 < (acts > 0).float().mean() < 1  # some features fire, not all
    torch.testing.assert_close(cache[f"{ALIAS}.hook_sae_input"], x, rtol=0, atol=0)
    error = cache[f"{ALIAS}.hook_sae_error"]
    torch.testing.assert_close(error, x - sae.decode(sae.encode(x)), rtol=0, atol=1e-6)
    torch.testing.assert_close(cache[ALIAS], x, rtol=0, atol=1e-6)  # what the model goes on with


def test_error_term_with_an_edited_feature_subtracts_its_decoder_direction(llava):
    """SAELens's semantics: decode(edited features) + (x - decode(features))."""
    vlm = llava.vlm
    batch = batch_of(vlm)
    sae = make_sae("standard", ALIAS)
    _, clean_cache = vlm.run_with_cache(batch, names_filter=ALIAS)
    x = clean_cache[ALIAS]
    off = torch.arange(0, 96, 3)

    def ablate(acts, hook):
        acts = acts.clone()
        acts[..., off] = 0
        return acts

    with vlm_saes(vlm, [sae], use_error_term=True):
        with vlm.hooks(fwd_hooks=[(f"{ALIAS}.hook_sae_acts_post", ablate)]):
            _, cache = vlm.run_with_cache(batch, names_filter=ALIAS)
    removed = sae.encode(x)[..., off] @ sae.W_dec[off]
    assert removed.abs().max() > 1e-2
    torch.testing.assert_close(cache[ALIAS], x - removed, rtol=0, atol=1e-5)
    with vlm_saes(vlm, [sae], use_error_term=True):  # an edited error term is what gets added
        with vlm.hooks(fwd_hooks=[(f"{ALIAS}.hook_sae_error", lambda error, hook: 0 * error)]):
            _, cache = vlm.run_with_cache(batch, names_filter=ALIAS)
    torch.testing.assert_close(cache[ALIAS], sae(x), rtol=0, atol=1e-6)


def test_error_term_gradients_flow_through_the_sae_only(llava):
    """As SAELens: the error term is a constant, so the SAE's weights get the gradient the
    reconstruction gets (while the logits are the clean ones)."""
    vlm = llava.vlm
    batch, clean = batch_and_clean(vlm)
    sae = make_sae("jumprelu", ALIAS)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]

    def reference(x, hook):
        recons = sae(x)
        return recons + (x - recons).detach()

    leaves = []

    def upstream_leaf(x, hook):  # the gradient upstream of the SAE, too
        leaves.append(x.detach().requires_grad_())
        return leaves[-1]

    grads = []
    with torch.enable_grad(), vlm.hooks(fwd_hooks=[("blocks.0.hook_resid_post", upstream_leaf)]):
        for run in (
            lambda: run_with_saes(vlm, batch, saes=[sae], use_error_term=True),
            lambda: vlm.run_with_hooks(batch, fwd_hooks=[(ALIAS, reference)]),
        ):
            logits = run()
            grads.append(torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), [*params, leaves[-1]]))
    torch.testing.assert_close(logits, clean, rtol=0, atol=1e-5)
    assert all(grad.abs().max() > 0 for grad in grads[0])
    for spliced, expected in zip(*grads):
        torch.testing.assert_close(spliced, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ SAELens's folder format
def saelens6_cfg(architecture: str, hook_name: str, d_in: int, d_sae: int, **extra) -> dict:
    """cfg.json exactly as SAELens 6.18 ``save_model`` writes it (SAEConfig.to_dict)."""
    cfg = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.18.0",
            "sae_lens_training_version": "6.18.0",
            "hook_name": hook_name,
            "model_name": "llava-hf/llava-1.5-7b-hf",
        },
    }
    if architecture == "topk":
        cfg.update(k=extra.pop("k"), rescale_acts_by_decoder_norm=False)
    return {**cfg, "architecture": architecture, **extra}


def random_weights(architecture: str, d_in: int = D_MODEL, d_sae: int = 96, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    weights = {
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_in**0.5,
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_dec": 0.1 * torch.randn(d_in, generator=g),
        "b_enc": 0.1 * torch.randn(d_sae, generator=g) - 0.3,
    }
    if architecture == "jumprelu":  # some negative: SAELens's relu(pre) * (pre > threshold) zeroes them
        weights["threshold"] = 0.6 * torch.rand(d_sae, generator=g) - 0.2
    return weights


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saelens_folder_loads_and_follows_the_formulas(llava, tmp_path, architecture):
    extra = {"k": 5} if architecture == "topk" else {}
    weights = random_weights(architecture)
    (tmp_path / "cfg.json").write_text(json.dumps(saelens6_cfg(architecture, ALIAS, D_MODEL, 96, **extra)))
    save_file(weights, tmp_path / "sae_weights.safetensors")
    sae = SAE.load_from_disk(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.k) == (architecture, ALIAS, extra.get("k"))
    for name, tensor in weights.items():
        torch.testing.assert_close(getattr(sae, name).data, tensor, rtol=0, atol=0)

    scale = torch.logspace(-2, 0.5, 7)[:, None]  # small inputs: fewer than k pre-activations above 0
    x = torch.randn(3, 7, D_MODEL, generator=torch.Generator().manual_seed(2)) * scale
    acts = sae.encode(x)
    torch.testing.assert_close(acts, reference_acts(architecture, weights, x, k=5), rtol=0, atol=1e-6)
    recons = acts @ weights["W_dec"] + weights["b_dec"]
    torch.testing.assert_close(sae.decode(acts), recons, rtol=0, atol=1e-6)
    torch.testing.assert_close(sae(x), recons, rtol=0, atol=1e-6)
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    positive = (pre > 0).sum(-1)
    if architecture == "topk":  # k honoured, and the ReLU: at most k features, none negative
        assert (positive >= 5).any() and (positive < 5).any()
        torch.testing.assert_close((acts > 0).sum(-1), positive.clamp(max=5), rtol=0, atol=0)
    if architecture == "jumprelu":  # the threshold honoured: features at or below it are off
        threshold = weights["threshold"]
        assert ((pre > 0) & (pre <= threshold)).any() and ((pre < 0) & (pre > threshold)).any()
        assert ((acts > 0) == ((pre > threshold) & (pre > 0))).all()

    # the loaded SAE splices like the in-memory one built from the same weights
    in_memory = make_sae(architecture, ALIAS, **extra)
    in_memory.load_state_dict(weights)
    batch = batch_of(llava.vlm)
    torch.testing.assert_close(
        run_with_saes(llava.vlm, batch, saes=[sae]),
        run_with_saes(llava.vlm, batch, saes=[in_memory]),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize(
    "config",
    [
        {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}},
        {"architecture": "topk", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}},
        {"activation_fn": "topk", "activation_fn_kwargs": {"k": 4}},  # very old: activation_fn, no arch
    ],
)
@pytest.mark.parametrize("hook_key", ["hook_name", "hook_point"])
def test_older_saelens_configs_load(tmp_path, config, hook_key):
    """SAELens < 6 wrote the hook name at the top level (``hook_point`` before 3.x) and top-k as
    ``activation_fn_str="topk"`` with ``activation_fn_kwargs.k``."""
    cfg = {
        "d_in": D_MODEL,
        "d_sae": 96,
        "dtype": "torch.float32",
        "device": "cuda",
        hook_key: ALIAS,
        "hook_layer": 1,
        "hook_head_index": None,
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": False,
        "context_size": 128,
        **config,
    }
    weights = random_weights("topk")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file({**weights, "scaling_factor": torch.ones(96)}, tmp_path / "sae_weights.safetensors")
    sae = SAE.load_from_disk(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_name) == ("topk", 4, ALIAS)
    assert sae.device == torch.device("cpu")  # cfg.json's device is where it was trained
    x = torch.randn(5, D_MODEL)
    torch.testing.assert_close(sae.encode(x), reference_acts("topk", weights, x, k=4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_to_disk_writes_saelens_format_and_round_trips(tmp_path, architecture):
    sae = make_sae(architecture, ALIAS, seed=3)
    sae.save_to_disk(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == ALIAS and cfg["architecture"] == architecture
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (
        64,
        96,
        "float32",
        "none",
    )
    assert cfg.get("k") == (8 if architecture == "topk" else None)
    tensors = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if architecture == "jumprelu" else set())
    assert set(tensors) == expected
    loaded = SAE.load_from_disk(tmp_path / "sae", dtype=torch.float64)
    assert loaded.dtype == torch.float64 and loaded.cfg.hook_name == ALIAS
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor.double(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
        ({"normalize_activations": True}, "normalize_activations"),
        ({"architecture": "gated"}, "gated"),
        ({"architecture": "standard", "activation_fn_str": "tanh-relu"}, "tanh-relu"),
        ({"architecture": "topk"}, "k="),
        ({"metadata": {"hook_name": ALIAS, "hook_head_index": 3}}, "hook_head_index"),
        ({"metadata": {}}, "hook name"),
        ({"drop": "threshold"}, "missing threshold"),
        ({"W_enc": torch.zeros(32, 96)}, "W_enc is (32, 96), expected (64, 96)"),
        ({"no_safetensors": True}, "sae_weights.safetensors does not exist"),
    ],
)
def test_unsupported_or_broken_folders_are_refused(tmp_path, change, fragment):
    cfg = saelens6_cfg("jumprelu", ALIAS, D_MODEL, 96)
    weights = random_weights("jumprelu")
    for key, value in change.items():
        if key == "drop":
            del weights[value]
        elif key == "no_safetensors":
            continue
        elif isinstance(value, torch.Tensor):
            weights[key] = value
        else:
            cfg[key] = value
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    if "no_safetensors" in change:
        (tmp_path / "sae_weights.pt").write_bytes(b"a pickle is never read")
    else:
        save_file(weights, tmp_path / "sae_weights.safetensors")
    with pytest.raises(SAEError) as info:
        SAE.load_from_disk(tmp_path)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert isinstance(info.value, HookedVLMError)


# ------------------------------------------------------------------ alias names inside the context
class LensLikeSAE(HookedRootModule):
    """A SAELens-6-like object: a HookedRootModule whose setup() names its own hook points."""

    def __init__(self, sae: SAE) -> None:
        super().__init__()
        self.inner = sae
        self.cfg = SimpleNamespace(d_in=sae.cfg.d_in, metadata=SimpleNamespace(hook_name=sae.cfg.hook_name))
        self.hook_sae_acts_post = HookPoint()
        self.setup()

    def encode(self, x):
        return self.hook_sae_acts_post(self.inner.encode(x))

    def decode(self, acts):
        return self.inner.decode(acts)


def test_run_with_cache_with_alias_names_inside_the_context(llava):
    """Regression: a registered hook point whose ``.name`` is not its key (e.g. renamed by a
    HookedRootModule's setup()) made the bridge's alias resolution raise KeyError."""
    vlm = llava.vlm
    batch = batch_of(vlm)
    sae = make_sae("topk", ALIAS)
    other = LensLikeSAE(make_sae("standard", "blocks.0.hook_mlp_out", seed=4))
    aliases = ["hook_embed", "blocks.0.hook_resid_post", ALIAS, "blocks.0.hook_mlp_out"]
    with vlm_saes(vlm, [sae, other]):
        for name in sae_names_in(vlm):
            assert vlm.hook_dict[name].name == name
        other.setup()  # renames the object's own points: none of them is registered on the VLM
        logits, cache = vlm.run_with_cache(batch)  # every hook point, SAE ones included
        _, some = vlm.run_with_cache(batch, names_filter=[*aliases, f"{ALIAS}.hook_sae_acts_post"])
        _, by_predicate = vlm.run_with_cache(batch, names_filter=lambda n: n.startswith(ALIAS))
    torch.testing.assert_close(logits, run_with_saes(vlm, batch, saes=[sae, other]), rtol=0, atol=0)
    for name in aliases:
        torch.testing.assert_close(some[name], cache[vlm.hook_dict[name].name], rtol=0, atol=0)
    torch.testing.assert_close(some["resid_pre", 1], sae(cache[f"{ALIAS}.hook_sae_input"]), rtol=0, atol=0)
    acts = some[f"{ALIAS}.hook_sae_acts_post"]
    torch.testing.assert_close(by_predicate[f"{ALIAS}.hook_sae_acts_post"], acts, rtol=0, atol=0)
    assert ((acts > 0).sum(-1) <= 8).all()
    assert "blocks.0.hook_mlp_out.hook_sae_acts_post" in cache.keys()


# ------------------------------------------------------------------ duck-typed SAEs
class PlainSAE:
    """Not an nn.Module: just encode, decode and a hook name."""

    def __init__(self, hook_name: str, seed: int = 5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.hook_name = hook_name
        self.W = torch.randn(D_MODEL, 48, generator=g) / 8

    def encode(self, x):
        return (x @ self.W).relu()

    def decode(self, acts):
        return acts @ self.W.T


@pytest.mark.parametrize("spelling", ["attribute", "cfg", "cfg.metadata"])
def test_a_duck_typed_sae_is_spliced(llava, spelling):
    vlm = llava.vlm
    batch = batch_of(vlm)
    sae = PlainSAE(ALIAS)
    if spelling != "attribute":
        del sae.hook_name
        sae.cfg = SimpleNamespace(hook_name=ALIAS)
        if spelling == "cfg.metadata":
            sae.cfg = SimpleNamespace(metadata={"hook_name": ALIAS})
    _, clean_cache = vlm.run_with_cache(batch, names_filter=ALIAS)
    logits, cache = run_with_cache_with_saes(vlm, batch, saes=sae, names_filter=f"{ALIAS}.hook_sae_acts_post")
    plain = vlm.run_with_hooks(batch, fwd_hooks=[(ALIAS, lambda x, hook: sae.decode(sae.encode(x)))])
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache[f"{ALIAS}.hook_sae_acts_post"], sae.encode(clean_cache[ALIAS]))
    with pytest.raises(SAEError, match="encode"):
        run_with_saes(vlm, batch, saes=[object()])


# ------------------------------------------------------------------ positions
def test_image_only_sae_leaves_text_positions_clean(family):
    vlm = family.vlm
    batch = batch_of(vlm)
    sae = make_sae("standard", ALIAS)
    clean_logits, clean = vlm.run_with_cache(batch, names_filter=ALIAS)
    logits, cache = run_with_cache_with_saes(vlm, batch, saes=[sae], positions="image", names_filter=ALIAS)
    image = batch.image_mask
    assert image.any() and (~image).any()
    torch.testing.assert_close(cache[ALIAS][~image], clean[ALIAS][~image], rtol=0, atol=0)
    torch.testing.assert_close(cache[ALIAS][image], sae(clean[ALIAS])[image], rtol=0, atol=1e-6)
    assert (logits - clean_logits).abs().max() > 1e-2
    mask_logits = run_with_saes(vlm, batch, saes=[sae], positions=batch.image_mask)
    torch.testing.assert_close(mask_logits, logits, rtol=0, atol=0)


def test_image_only_sae_during_generation(llava):
    vlm = llava.vlm
    batch = batch_of(vlm)
    sae = make_sae("standard", ALIAS)
    with vlm_saes(vlm, [sae], positions=batch.image_mask):
        tokens = vlm.generate(batch, max_new_tokens=3)
        first = vlm(batch)[torch.arange(2), batch.last_positions].argmax(-1)
    assert tokens.shape == (2, 3)
    assert torch.equal(tokens[:, 0], first)


# ------------------------------------------------------------------ bad input
def test_bad_input_raises_one_line_errors_and_leaves_the_model_clean(llava):
    vlm = llava.vlm
    batch, clean = batch_and_clean(vlm)
    cases = [
        (make_sae("standard", ALIAS, d_in=32), "d_in=32 but the activation there is [2, 45, 64] (width 64)"),
        (make_sae("standard", "blocks.1.hook_resid_prre"), "Did you mean 'blocks.1.hook_resid_pre'"),
        (
            [make_sae("standard", ALIAS), make_sae("standard", "blocks.1.hook_in")],
            "'blocks.1.hook_resid_pre' and 'blocks.1.hook_in' name the same hook point",
        ),
        (make_sae("standard", "blocks.0.attn.hook_result"), "vlm.set_use_attn_result(True)"),
    ]
    for saes, fragment in cases:
        with pytest.raises(SAEError) as info:
            run_with_saes(vlm, batch, saes=saes)
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert isinstance(info.value, HookedVLMError)
        assert sae_names_in(vlm) == []
    torch.testing.assert_close(vlm(batch), clean, rtol=0, atol=0)
    with pytest.raises(SAEError, match=r"positions is \[2, 7\]"):
        run_with_saes(
            vlm, batch, saes=make_sae("standard", ALIAS), positions=torch.ones(2, 7, dtype=torch.bool)
        )
    with vlm_saes(vlm, make_sae("standard", ALIAS)):  # nested: the same point twice
        with pytest.raises(SAEError, match="exit the context"):
            run_with_saes(vlm, batch, saes=make_sae("topk", "blocks.1.hook_in"))
    assert sae_names_in(vlm) == []


def test_hooked_vlm_methods_are_the_module_functions(llava):
    """``vlm.saes``, ``vlm.run_with_saes`` and ``vlm.run_with_cache_with_saes``, as on SAELens's
    HookedSAETransformer."""
    vlm = llava.vlm
    batch, _ = batch_and_clean(vlm)
    sae = make_sae("topk", "blocks.1.hook_resid_post")
    expected = run_with_saes(vlm, batch, saes=[sae], positions="image")
    assert torch.equal(vlm.run_with_saes(batch, saes=[sae], positions="image"), expected)
    with vlm.saes([sae], positions=batch.image_mask):
        assert torch.equal(vlm(batch), expected)
    name = "blocks.1.hook_resid_post.hook_sae_acts_post"
    logits, cache = vlm.run_with_cache_with_saes(batch, saes=[sae], positions="image", names_filter=name)
    assert torch.equal(logits, expected) and cache[name].shape[-1] == sae.cfg.d_sae
    assert sae_names_in(vlm) == []
