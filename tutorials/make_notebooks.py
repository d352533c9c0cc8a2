"""Writes the tutorial notebooks; with ``--execute`` runs them and writes them with their outputs.

After editing a cell here (or in make_probing_notebook.py), regenerate and re-execute every notebook:

    python tutorials/make_notebooks.py --execute                      # all of them (about 2 minutes)
    python tutorials/make_notebooks.py --execute 05_interventions     # some of them

Each notebook runs top to bottom on the shipped demo model on a CPU, in a temporary folder (nothing is
written into tutorials/), and ends with the commands for the real 7B models on a GPU. The committed
notebooks carry their outputs (figures as PNG, so GitHub and nbconvert show them);
tests/test_tutorials.py checks that they are what this script writes now and that a fresh run prints
the same.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

#: the first lines of every notebook: progress bars, warnings and library logs would land on stderr
QUIET = """# ruff: noqa: E402 (the imports come after silencing them)
import os
import warnings

os.environ["TQDM_DISABLE"] = "1"  # no progress bars (set before any library imports tqdm)
warnings.filterwarnings("ignore")  # no library warnings: the outputs below are the tutorial's own"""


def setup(plots: bool = True, viz: bool = True) -> str:
    """The setup cell: silence stderr, load the demo model, a batch of 8 held-out images."""
    imports = "import matplotlib.pyplot as plt\n" if plots else ""
    return (
        QUIET
        + "\n"
        + imports
        + """import torch
import transformers
from hooked_vllm import HookedVLM
"""
        + ("from hooked_vllm.report import viz\n" if viz else "")
        + """from hooked_vllm.demo import demo_model_dir, shapes

transformers.logging.set_verbosity_error()  # nor Hugging Face's log lines
torch.set_grad_enabled(False)

# The shipped demo model: a toy LLaVA trained on synthetic shapes. On a GPU, use a real one instead:
# vlm = HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", dtype=torch.float16, device="cuda")
vlm = HookedVLM.from_pretrained(str(demo_model_dir()))
examples = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + 123, n=8, kinds=("colour",))
batch = vlm.prepare([ex.image for ex in examples], [ex.question for ex in examples])
print(vlm.cfg.n_layers, "layers;", int(batch.image_mask[0].sum()), "image tokens per item")
print(vlm.to_str_tokens(batch, 0))"""
    )


GPU = """## On the real models (GPU)
```python
vlm = HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", dtype=torch.float16, device="cuda")
# or: HookedVLM.from_pretrained("Salesforce/instructblip-vicuna-7b", dtype=torch.bfloat16, device="cuda")
batch = vlm.prepare(images=["photo.jpg"], prompts=["Describe the image in one sentence."])
```
Everything above runs unchanged; the visual prefix is then 576 CLIP patches (LLaVA-1.5) or 32
Q-Former queries (InstructBLIP)."""

NOTEBOOKS = {
    "01_contextualization.ipynb": [
        new_markdown_cell(
            "# Contextualization: how alike are image and instruction tokens, layer by layer?\n"
            "Mean cosine similarity within the image tokens, within the instruction tokens, and "
            "across them (the first lens of Wei, Shi & Inoue, arXiv 2411.00646), computed in O(n d) from sums of unit vectors."
        ),
        new_code_cell(setup(viz=False)),
        new_code_cell("""from hooked_vllm.analysis import contextualization_from_cache, pair_mean_cosine

logits, cache = vlm.run_with_cache(batch, names_filter=lambda n: "resid" in n)
sums = contextualization_from_cache(cache, batch.image_mask, batch.text_mask)
curves = {group: values.nanmean(-1) for group, values in sums.per_item().items()}  # [layer + 1] each
fig, ax = plt.subplots(figsize=(6, 3.5))
for group, curve in curves.items():
    ax.plot(curve.numpy(), "o-", label=group)
ax.set_xlabel("layer (0 = embedding)")
ax.set_ylabel("mean cosine")
ax.legend()
ax.set_title(f"Contextualization, mean of {len(batch)} items")
plt.show()"""),
        new_code_cell("""# The efficient form equals the naive pairwise mean:
h = cache["blocks.2.hook_resid_post"]
fast = pair_mean_cosine(h, batch.image_mask, batch.text_mask)
units = h / h.norm(dim=-1, keepdim=True)
naive = torch.stack(
    [(units[b][batch.image_mask[b]] @ units[b][batch.text_mask[b]].T).mean() for b in range(len(batch))]
)
assert torch.allclose(fast, naive, atol=1e-5)
print(
    f"image-instruction mean cosine at layer 3, item 0: {float(fast[0]):.3f} (naive: {float(naive[0]):.3f})"
)"""),
        new_code_cell("""# Anisotropy: the same cosine between tokens of *different* inputs, and the adjusted curve.
from hooked_vllm.analysis import cross_input_baseline

baseline = cross_input_baseline(
    sums.modality_sum["image"],
    sums.modality_count["image"],
    sums.modality_sum["text"],
    sums.modality_count["text"],
)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(curves["inter"].numpy(), "o-", label="inter-modal, raw")
ax.plot(baseline.numpy(), "s:", label="across inputs (anisotropy baseline)")
ax.plot((curves["inter"] - baseline).numpy(), "o-", label="inter-modal, adjusted")
ax.axhline(0, color="0.6", lw=0.8)
ax.set_xlabel("layer (0 = embedding)")
ax.set_ylabel("mean cosine")
ax.legend(fontsize=8)
plt.show()"""),
        new_markdown_cell(GPU),
    ],
    "02_norm_attention.ipynb": [
        new_markdown_cell(
            "# Norm-based attention (Kobayashi et al. 2020)\n"
            "How much each key *contributes* to a query: ||alpha f(x)|| rather than alpha alone."
        ),
        new_code_cell(setup()),
        new_code_cell("""from hooked_vllm.analysis import head_norms, head_summed_norms, collect

logits, cache = vlm.run_with_cache(batch)
layer = 2
per_head = head_norms(cache["pattern", layer], cache["v", layer], vlm.W_O[layer])  # [b, head, q, k]
summed = head_summed_norms(cache["pattern", layer], cache["v", layer], vlm.W_O[layer])  # [b, q, k]
last = batch.last_positions[0]
print(
    f"weight given by the last position to image tokens: {float(cache['pattern', layer][0, :, last][:, batch.image_mask[0]].sum(-1).mean()):.3f}"
)
print(
    f"norm-based share of the last position on image tokens: {float(summed[0, last][batch.image_mask[0]].sum() / summed[0, last].sum()):.3f}"
)"""),
        new_markdown_cell(
            "The attention weights of layer 2 beside the norm-based map (the same `show_attention` "
            "takes a `[batch, query, key]` map); the strips mark each position's modality, and on the "
            "right the last position's attention lies over the image."
        ),
        new_code_cell("""viz.show_attention(vlm, cache, batch, item=0, layer=layer, image=examples[0].image)
viz.show_attention(
    vlm, summed, batch, item=0, layer=layer, image=examples[0].image, label="norm-based attention"
)
plt.show()"""),
        new_code_cell("""# The whole network in one pass, by modality pair:
result = collect(vlm, batch)
fig, ax = plt.subplots(figsize=(6, 3.5))
for pair, values in result.attention.norm.items():
    ax.plot(range(vlm.cfg.n_layers), values.nanmean(-1).numpy(), "o-", label=pair)
ax.set_xlabel("layer (block l's attention, as show_attention's layer=)")
ax.set_ylabel("norm-based attention (block mean)")
ax.set_title("query <- key, mean over items")
ax.legend(fontsize=8)
plt.show()"""),
        new_markdown_cell(
            "`collect` never builds a pattern: attention runs as HF's fused sdpa and alpha is recomputed "
            "from the queries and keys 64 rows at a time (a Triton kernel on a GPU). The bridge's "
            "`hook_pattern` path gives the same numbers, to float rounding (sdpa and the step-by-step "
            "attention round differently, and the difference travels up the residual stream):"
        ),
        new_code_cell("""import torch

from_patterns = collect(vlm, batch, attention="pattern")
for pair in result.attention.norm:
    assert torch.allclose(
        result.attention.norm[pair], from_patterns.attention.norm[pair], rtol=1e-4, atol=1e-5, equal_nan=True
    )
print("fused and pattern paths agree on", len(result.attention.norm), "modality pairs")"""),
        new_markdown_cell("Which image patches does the answer read? Each patch's saliency, on the image:"),
        new_code_cell("""print("question:", examples[0].question, "-> answer:", examples[0].answer)
for layer in (1, vlm.cfg.n_layers - 1):
    viz.show_saliency(vlm, batch, result, item=0, layer=layer, image=examples[0].image)
plt.show()"""),
        new_markdown_cell(GPU),
    ],
    "03_logit_lens.ipynb": [
        new_markdown_cell("# The logit lens: what does each layer already predict?"),
        new_code_cell(setup()),
        new_code_cell("""from hooked_vllm.analysis import LogitLens, collect, resid_stack_from_cache

logits, cache = vlm.run_with_cache(batch)
lens = LogitLens.from_vlm(vlm)
stack = resid_stack_from_cache(cache, batch.last_positions[:, None])  # [layer+1, b, 1, d]
result = lens.summarize(stack, k=3)
print("question:", examples[0].question, "-> answer:", examples[0].answer)
for layer in range(stack.shape[0]):
    words = [vlm.tokenizer.decode([int(t)]) for t in result.top_tokens[layer, 0, 0]]
    print(f"layer {layer}: top 3 {words}, rank of the final answer {int(result.final_rank[layer, 0, 0])}")"""),
        new_code_cell("""# The same at every item: the rank of the final answer, layer by layer
ranks = result.final_rank[:, :, 0].float()  # [layer+1, item]
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(ranks.numpy(), color="0.7", lw=0.8)
ax.plot(ranks.median(-1).values.numpy(), "o-", color="k", label="median")
ax.set_yscale("symlog")
ax.set_xlabel("layer (0 = embedding)")
ax.set_ylabel("rank of the final answer")
ax.legend()
plt.show()"""),
        new_markdown_cell(
            "## Verbalization of image tokens\n"
            "Which word does each image patch turn into, by layer? `collect(..., verbalize_images=True)` "
            "reads the logit lens at every image position; `viz.show_lens_grid` writes each patch's "
            "top-1 token on the image's patch grid."
        ),
        new_code_cell("""result = collect(vlm, batch, verbalize_images=True)
fig, ax = plt.subplots(figsize=(3, 3))
ax.imshow(examples[0].image)
ax.set_axis_off()
ax.set_title("item 0")
for layer in (1, vlm.cfg.n_layers // 2, vlm.cfg.n_layers):
    viz.show_lens_grid(vlm, batch, result, item=0, layer=layer)
plt.show()"""),
        new_markdown_cell(GPU),
    ],
    "04_phase_diagram.ipynb": [
        new_markdown_cell(
            "# The full phase diagram\nThe three lenses over a dataset, the phases located, "
            "and the report. This is what `hooked-vllm phase-diagram` runs."
        ),
        new_code_cell(setup(plots=False, viz=False)),
        new_markdown_cell(
            "The phases are about how a *pretrained* language model takes in a visual prefix, and need "
            "depth. So the main job's default is not the 6-layer demo above but `demo-phases`: a LLaVA "
            "whose 16-layer language model was pretrained on text, then given a projector aligned to it "
            "with the language model frozen, then instruction-tuned (its model card, "
            "`hooked_vllm/demo/phases/MODEL_CARD.md`, shows what each stage does to the curves). The "
            "sample is the main job's default size: enough held-out items that the 95% bands are narrow."
        ),
        new_code_cell("""import tempfile
from hooked_vllm.cli.common import SHAPES_ITEMS
from hooked_vllm.runs.shapes_dataset import load_shapes
from hooked_vllm.runs.phase_diagram import ResultStore, run_phase_diagram
from hooked_vllm.report.html import write_report

vlm = HookedVLM.from_pretrained("demo-phases")
out = tempfile.mkdtemp()
sample = load_shapes(f"{out}/images", n=SHAPES_ITEMS["demo-phases"])
result = run_phase_diagram(vlm, sample, out, batch_size=32, progress=False)
print(vlm.cfg.n_layers, "layers;", result.aggregates["n_items"], "items")
for phase in result.aggregates["phases"]:
    where = f"layers {phase['start']}-{phase['end']}" if phase["found"] else "not found"
    print(f"{phase['name']:22s} {where:12s} {phase['evidence']}")"""),
        new_markdown_cell(
            "Read with today's rules (`hooked_vllm/analysis/phases.py`), these curves show one phase of "
            "four: alignment, an early rise of inter-modal contextualization. The three others are not "
            "there: the curves rise almost monotonically to the last layer (no suppression of "
            "inter-modal contextualization after alignment, so no minimum for a late rise to start from), "
            "fall only slightly in the last two layers, and the logit lens settles half way up. A "
            "phase whose rule fails is reported absent, never invented; the model card shows the curves "
            "after each training stage (issue 27 is open on making a miniature show all four)."
        ),
        new_markdown_cell(
            "The report: `report.html` holds the interactive figures (plotly), `phase_diagram.png` and "
            "`attention.png` the same curves as static images, shown here:"
        ),
        new_code_cell("""from IPython.display import Image, display

rows, _ = ResultStore(out).read()
write_report(out, result.aggregates, rows, vlm.tokenizer, title="demo-phases on shapes")
display(Image(filename=f"{out}/phase_diagram.png"), Image(filename=f"{out}/attention.png"))"""),
        new_markdown_cell(
            GPU + "\n\nFrom the shell, with COCO captions on disk:\n```\nhooked-vllm phase-diagram "
            "--model llava-hf/llava-1.5-7b-hf --dataset coco --data-dir /data/coco --n 500 "
            "--device cuda --dtype float16 --out runs/llava-coco\n```"
        ),
    ],
    "05_interventions.ipynb": [
        new_markdown_cell(
            "# Interventions: patching, knockout, pruning\nThe phase diagram says *where* image "
            "and text interact; interventions test it causally."
        ),
        new_code_cell(setup()),
        new_code_cell("""from hooked_vllm.demo.shapes import Shape, render
from hooked_vllm.interventions import logit_diff, patch_by_modality

# Same question, the square red in one image and blue in the other.
red = render([Shape("square", "red", 40, 24, 6)])
blue = render([Shape("square", "blue", 40, 24, 6)])
question = ["what colour is the square ?"]
clean, corrupt = vlm.prepare([red], question), vlm.prepare([blue], question)
red_id, blue_id = vlm.tokenizer.convert_tokens_to_ids(["red", "blue"])
metric = logit_diff(corrupt, red_id, blue_id)
fig, axes = plt.subplots(1, 2, figsize=(5, 2.5))
for ax, image, name in zip(axes, (red, blue), ("clean (source)", "corrupt (target)")):
    ax.imshow(image)
    ax.set_title(name)
    ax.set_axis_off()
plt.show()"""),
        new_markdown_cell(
            "## Patching by modality\n"
            "Copy the clean run's residual stream into the corrupt run at the image, the instruction "
            "or the last position, one layer at a time, and read the logit difference red - blue. "
            "White is no effect (the corrupt run's value); blue restores the clean answer."
        ),
        new_code_cell("""result = patch_by_modality(vlm, clean, corrupt, metric, groups=("image", "text", "last"))
viz.show_patching(result, metric="logit diff red - blue")
plt.show()"""),
        new_markdown_cell(
            "The same per position: a group may be any `[batch, pos]` mask, so one mask per position "
            "gives the layer x position heatmap."
        ),
        new_code_cell("""n_pos = clean.shape[1]
one_position = [torch.arange(n_pos)[None] == p for p in range(n_pos)]
by_position = patch_by_modality(vlm, clean, corrupt, metric, groups=one_position)
viz.show_patching(
    by_position, str_tokens=vlm.to_str_tokens(clean), batch=clean, metric="logit diff red - blue"
)
plt.show()"""),
        new_markdown_cell(
            "## Attention knockout\n"
            "Block the image -> last and image -> instruction edges in a window of two layers, "
            "sliding the window up the network."
        ),
        new_code_cell("""from hooked_vllm.interventions import knockout, knockout_sweep

clean_metric = logit_diff(clean, red_id, blue_id)
sweep = knockout_sweep(vlm, clean, [("image", "last"), ("image", "text")], clean_metric, window=2).squeeze(-1)
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar([f"{start}-{start + 1}" for start in range(len(sweep))], sweep.numpy(), color="tab:purple")
ax.axhline(float(clean_metric(vlm(clean))), color="k", ls="--", label="nothing blocked")
ax.set_xlabel("layers blocked")
ax.set_ylabel("logit diff red - blue")
ax.legend()
plt.show()
with knockout(vlm, clean, edges=[("image", "text"), ("image", "last")]):
    print("all layers blocked:", vlm.generate(clean, max_new_tokens=1, return_str=True))"""),
        new_markdown_cell(
            "## Visual-token pruning\n"
            "Keep the k image tokens the norm-based attention ranks highest from layer K on, and "
            "compare the next token with the unpruned run."
        ),
        new_code_cell("""from hooked_vllm.interventions import pruning_curve

examples = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + 5, n=32, kinds=("colour", "shape"))
batch = vlm.prepare([ex.image for ex in examples], [ex.question for ex in examples])
points = pruning_curve(vlm, batch, ks=[16, 8, 4, 2, 1], from_layers=[1, 3], method="norm")
fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
for from_layer in (1, 3):
    mine = [p for p in points if p.from_layer == from_layer]
    left.plot(
        [p.k for p in mine], [p.top1_agreement for p in mine], "o-", label=f"pruned from layer {from_layer}"
    )
    right.plot([p.k for p in mine], [p.kl for p in mine], "o-", label=f"pruned from layer {from_layer}")
for ax, name in ((left, "top-1 agreement"), (right, "KL to the unpruned run")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("image tokens kept")
    ax.set_ylabel(name)
left.legend(fontsize=8)
plt.show()"""),
        new_markdown_cell(GPU),
    ],
    "06_transformerlens_style.ipynb": [
        new_markdown_cell(
            "# TransformerLens style on a vision LLM\n"
            "Your TransformerLens code runs on `HookedVLM` as it is: string prompts, `test_prompt`, "
            "hooks, `transformer_lens.patching`, direct logit attribution, SAEs. What is new is the "
            "image: a `VLMBatch` carries it, and every position knows its modality."
        ),
        new_code_cell(setup()),
        new_markdown_cell("## Text alone, exactly as in TransformerLens"),
        new_code_cell("""from transformer_lens import utilities as utils

print(vlm.to_str_tokens("what colour is the circle"))  # leading spaces kept, as TL does
utils.test_prompt("what colour is the", "circle", vlm)  # no image: the language model alone"""),
        new_markdown_cell(
            "## Activation patching with TransformerLens's own module\n"
            "Two images, one question. A `VLMBatch` answers `.shape` as its tokens would, so "
            "`get_act_patch_resid_pre` runs unchanged; `viz.show_patching` draws its `[layer, pos]` "
            "result with the tokens and their modality (white: the corrupt run, no effect)."
        ),
        new_code_cell("""from transformer_lens import patching
from hooked_vllm.demo.shapes import Shape, render

question = ["what colour is the square ?"]
red_image, blue_image = (
    render([Shape("square", "red", 40, 24, 6)]),
    render([Shape("square", "blue", 40, 24, 6)]),
)
clean, corrupt = vlm.prepare([red_image], question), vlm.prepare([blue_image], question)
red, blue = vlm.to_single_token("red"), vlm.to_single_token("blue")
_, clean_cache = vlm.run_with_cache(clean)


def metric(logits):
    return logits[0, -1, red] - logits[0, -1, blue]


effect = patching.get_act_patch_resid_pre(vlm, corrupt, clean_cache, metric)  # [layer, pos]
viz.show_patching(
    effect,
    str_tokens=vlm.to_str_tokens(clean),
    batch=clean,
    baseline=float(metric(vlm(corrupt))),
    metric="logit diff red - blue",
)
plt.show()"""),
        new_markdown_cell(
            "The colour sits in the one image patch that holds the square in the early layers, "
            "then moves to the last position."
        ),
        new_markdown_cell(
            "## A hook of your own\n"
            "A hook is `hook_fn(activation, hook)` returning the new activation, as in TransformerLens. "
            "This one overwrites the square's image patch with the mean of the image patches, in the "
            "residual stream entering each layer in turn. Before layer 0 the answer loses the colour; "
            "from layer 2 on the colour has left the patch (as the patching heatmap above shows) and "
            "the ablation no longer hurts."
        ),
        new_code_cell("""square = int(clean.image_mask[0].nonzero()[6])  # the image position that holds the square


def hook_fn(activation, hook):
    # activation: [batch, pos, d_model]; hook.name: "blocks.{layer}.hook_resid_pre"
    activation[:, square] = activation[:, clean.image_mask[0]].mean(1)
    return activation


unhooked = float(metric(vlm(clean)))
hooked = [
    float(metric(vlm.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook_fn)])))
    for layer in range(vlm.cfg.n_layers)
]
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(range(vlm.cfg.n_layers), hooked, color="tab:purple", label="square patch ablated")
ax.axhline(unhooked, color="k", ls="--", label="no hook")
ax.set_xlabel("layer whose resid_pre is hooked")
ax.set_ylabel("logit diff red - blue")
ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
plt.show()
with vlm.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", hook_fn)]):
    print(
        "answer with the square's patch ablated before layer 0:",
        vlm.generate(clean, max_new_tokens=1, return_str=True),
    )
print("answer without the hook:", vlm.generate(clean, max_new_tokens=1, return_str=True))"""),
        new_markdown_cell(
            "## Attention patterns, with the image\n"
            "`viz.show_attention` is a TransformerLens-style pattern view (query x key, each token "
            "labelled, image / instruction / special positions marked) that also lays a query's "
            "attention over the image (the red row). At layer 1, heads 0 and 1 of the last position "
            "put all their weight on the square's patch (half of the mean over heads); "
            "`per_head=True` draws every head."
        ),
        new_code_cell("""viz.show_attention(vlm, clean_cache, clean, item=0, layer=1, image=red_image)
viz.show_attention(vlm, clean_cache, clean, item=0, layer=1, per_head=True)
plt.show()"""),
        new_markdown_cell(
            "## Direct logit attribution, on image tokens too\n"
            "`hook_embed` holds what the residual stream starts from (the visual prefix at image "
            "positions), so the components sum to the residual everywhere; the cache applies the "
            "final norm's weight, so `logit_attrs` sums to the logit difference exactly."
        ),
        new_code_cell("""logits, cache = vlm.run_with_cache(clean)
stack, component_names = cache.decompose_resid(layer=-1, return_labels=True)
attrs = cache.logit_attrs(stack[:, :, -1], tokens=red, incorrect_tokens=blue, pos_slice=-1)[:, 0]
print(f"sum of attributions {float(attrs.sum()):.3f}, logit difference {float(metric(logits)):.3f}")
at_patch = cache.logit_attrs(stack[:, :, square], tokens=red, incorrect_tokens=blue, pos_slice=square)[:, 0]
fig, ax = plt.subplots(figsize=(8, 2.5))
ax.bar(range(len(component_names)), attrs.numpy(), label="last position")
ax.bar(range(len(component_names)), at_patch.numpy(), alpha=0.6, label=f"image position {square}")
ax.set_xticks(range(len(component_names)), component_names, rotation=60, fontsize=7)
ax.set_ylabel("red - blue")
ax.legend()
plt.show()"""),
        new_markdown_cell(
            "## A sparse autoencoder on image positions\n"
            "We train a small SAE on the layer-2 residual at image positions (two minutes of "
            "reading would do the same with a published SAE: `SAE.load_from_disk(folder)` reads "
            "SAELens's `cfg.json` + `sae_weights.safetensors`), splice it in on image positions only, "
            "and read which feature fires on each patch."
        ),
        new_code_cell("""import tempfile
from hooked_vllm.model.sae import SAE, SAEConfig, run_with_cache_with_saes

hook = "blocks.2.hook_resid_post"
train = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + 77, n=256, kinds=("colour", "shape"))
train_batch = vlm.prepare([ex.image for ex in train], [ex.question for ex in train])
_, acts = vlm.run_with_cache(train_batch, names_filter=hook)
x = acts[hook][train_batch.image_mask]  # [n_patches, d_model]
torch.manual_seed(0)
sae = SAE(SAEConfig(architecture="standard", d_in=x.shape[-1], d_sae=64, hook_name=hook))
with torch.enable_grad():
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(300):
        feats = sae.encode(x)
        loss = (sae.decode(feats) - x).pow(2).sum(-1).mean() + 3e-3 * feats.abs().sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
print(
    f"fraction of variance unexplained: {float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()):.2f}"
)
folder = sae.save_to_disk(tempfile.mkdtemp())  # SAELens's format
sae = SAE.load_from_disk(folder)"""),
        new_code_cell("""logits_with, cache = run_with_cache_with_saes(
    vlm, clean, saes=[sae], positions="image", use_error_term=True, names_filter=f"{hook}.hook_sae_acts_post"
)
print("logits unchanged with the error term:", torch.allclose(logits_with, vlm(clean), atol=1e-5))
features = cache[f"{hook}.hook_sae_acts_post"][0][clean.image_mask[0]]  # [16 patches, 64 features]
top = features.argmax(-1).reshape(4, 4)
strength = features.max(-1).values.reshape(4, 4)
fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3))
left.imshow(red_image)
left.set_title("image")
right.imshow(strength.numpy(), cmap="viridis")
right.set_title("top SAE feature per patch")
for (r, c), f in zip([(r, c) for r in range(4) for c in range(4)], top.flatten().tolist()):
    right.text(c, r, f, ha="center", va="center", color="white", fontsize=8)
plt.show()"""),
        new_markdown_cell(GPU),
    ],
}

PROBING = "07_probing.ipynb"  # its cells: make_probing_notebook.py


def _probing_cells() -> list:
    spec = importlib.util.spec_from_file_location("make_probing_notebook", HERE / "make_probing_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CELLS


def names() -> list[str]:
    """Every tutorial notebook's file name, in order."""
    return sorted([*NOTEBOOKS, PROBING])


def build(name: str) -> nbformat.NotebookNode:
    """Notebook ``name`` as this script writes it, without outputs (cell ids numbered, so a
    regenerated notebook differs from the committed one only where a cell did)."""
    cells = _probing_cells() if name == PROBING else NOTEBOOKS[name]
    notebook = new_notebook(
        cells=[nbformat.from_dict(cell) for cell in cells],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    for i, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{i:02d}"
    return notebook


def execute(notebook: nbformat.NotebookNode, cwd: str | Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run ``notebook`` in place, in folder ``cwd``, on the python3 kernel (no timing metadata)."""
    from nbclient import NotebookClient

    NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(cwd)}},
    ).execute()
    return notebook


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebooks", nargs="*", help="which ones (a name or its stem; default: all)")
    parser.add_argument("--execute", action="store_true", help="run each one and write it with its outputs")
    args = parser.parse_args(argv)
    chosen = [n for n in names() if not args.notebooks or n in args.notebooks or n[:-6] in args.notebooks]
    if args.notebooks and len(chosen) != len(args.notebooks):
        parser.error(f"unknown notebook among {args.notebooks}; choose from {names()}")
    for name in chosen:
        notebook = build(name)
        if args.execute:
            with tempfile.TemporaryDirectory() as cwd:
                execute(notebook, cwd)
        nbformat.write(notebook, HERE / name)
        print("wrote", HERE / name, "(executed)" if args.execute else "(no outputs)")


if __name__ == "__main__":
    main()
