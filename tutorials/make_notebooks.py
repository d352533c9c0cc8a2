"""Writes the tutorial notebooks (run `python tutorials/make_notebooks.py` after editing a cell).

Each notebook runs top to bottom on the shipped demo model on a CPU (tests/test_tutorials.py runs
them in CI) and ends with the commands for the real 7B models on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

SETUP = """import torch
from hooked_vllm import HookedVLM
from hooked_vllm.demo import demo_model_dir, shapes
torch.set_grad_enabled(False)

# The shipped demo model: a toy LLaVA trained on synthetic shapes. On a GPU, use a real one instead:
# vlm = HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", dtype=torch.float16, device="cuda")
vlm = HookedVLM.from_pretrained(str(demo_model_dir()))
examples = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + 123, n=8, kinds=("colour",))
batch = vlm.prepare([ex.image for ex in examples], [ex.question for ex in examples])
print(vlm.cfg.n_layers, "layers;", int(batch.image_mask[0].sum()), "image tokens per item")
print(vlm.to_str_tokens(batch, 0))"""

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
        new_code_cell(SETUP),
        new_code_cell("""from hooked_vllm.analysis import contextualization_from_cache, pair_mean_cosine
logits, cache = vlm.run_with_cache(batch, names_filter=lambda n: "resid" in n)
sums = contextualization_from_cache(cache, batch.image_mask, batch.text_mask)
curves = {group: values.nanmean(-1) for group, values in sums.per_item().items()}
for layer in range(vlm.cfg.n_layers + 1):
    print(layer, {g: round(float(c[layer]), 3) for g, c in curves.items()})"""),
        new_code_cell("""# The efficient form equals the naive pairwise mean:
h = cache["blocks.2.hook_resid_post"]
fast = pair_mean_cosine(h, batch.image_mask, batch.text_mask)
units = h / h.norm(dim=-1, keepdim=True)
naive = torch.stack([(units[b][batch.image_mask[b]] @ units[b][batch.text_mask[b]].T).mean() for b in range(len(batch))])
assert torch.allclose(fast, naive, atol=1e-5)
fast"""),
        new_code_cell("""# Anisotropy: the same cosine between tokens of *different* inputs, and the adjusted curve.
from hooked_vllm.analysis import cross_input_baseline
baseline = cross_input_baseline(sums.modality_sum["image"], sums.modality_count["image"],
                                sums.modality_sum["text"], sums.modality_count["text"])
print("inter raw     ", curves["inter"].numpy().round(3))
print("inter adjusted", (curves["inter"] - baseline).numpy().round(3))"""),
        new_markdown_cell(GPU),
    ],
    "02_norm_attention.ipynb": [
        new_markdown_cell(
            "# Norm-based attention (Kobayashi et al. 2020)\n"
            "How much each key *contributes* to a query: ||alpha f(x)|| rather than alpha alone."
        ),
        new_code_cell(SETUP),
        new_code_cell("""from hooked_vllm.analysis import head_norms, head_summed_norms, collect
logits, cache = vlm.run_with_cache(batch)
layer = 2
per_head = head_norms(cache["pattern", layer], cache["v", layer], vlm.W_O[layer])      # [b, head, q, k]
summed = head_summed_norms(cache["pattern", layer], cache["v", layer], vlm.W_O[layer])  # [b, q, k]
last = batch.last_positions[0]
print("weight given by the last position to image tokens:", float(cache["pattern", layer][0, :, last][:, batch.image_mask[0]].sum(-1).mean()))
print("norm-based share of the last position on image tokens:",
      float(summed[0, last][batch.image_mask[0]].sum() / summed[0, last].sum()))"""),
        new_code_cell("""# The whole network in one pass, by modality pair:
result = collect(vlm, batch)
for pair, values in result.attention.norm.items():
    print(f"{pair:14s}", values.nanmean(-1).numpy().round(3))"""),
        new_markdown_cell(
            "`collect` never builds a pattern: attention runs as HF's fused sdpa and alpha is recomputed "
            "from the queries and keys 64 rows at a time (a Triton kernel on a GPU). The bridge's "
            "`hook_pattern` path gives the same numbers, to float rounding (sdpa and the step-by-step "
            "attention round differently, and the difference travels up the residual stream):"
        ),
        new_code_cell("""import torch
from_patterns = collect(vlm, batch, attention="pattern")
for pair in result.attention.norm:
    assert torch.allclose(result.attention.norm[pair], from_patterns.attention.norm[pair], rtol=1e-4, atol=1e-5, equal_nan=True)
print("fused and pattern paths agree on", len(result.attention.norm), "modality pairs")"""),
        new_code_cell("""# Which image patches does the answer read? (the 4 x 4 patch grid of the demo model)
saliency = result.attention.image_saliency_from_last[:, 0]   # [layer, n_image]
side = int(saliency.shape[-1] ** 0.5)
print(saliency.sum(0).reshape(side, side).numpy().round(2))"""),
        new_markdown_cell(GPU),
    ],
    "03_logit_lens.ipynb": [
        new_markdown_cell("# The logit lens: what does each layer already predict?"),
        new_code_cell(SETUP),
        new_code_cell("""from hooked_vllm.analysis import LogitLens, resid_stack_from_cache, verbalize
logits, cache = vlm.run_with_cache(batch)
lens = LogitLens.from_vlm(vlm)
stack = resid_stack_from_cache(cache, batch.last_positions[:, None])   # [layer+1, b, 1, d]
result = lens.summarize(stack, k=3)
for layer in range(stack.shape[0]):
    words = [vlm.tokenizer.decode([int(t)]) for t in result.top_tokens[layer, 0, 0]]
    print(layer, words, "rank of final answer:", int(result.final_rank[layer, 0, 0]))
print("question:", examples[0].question, "-> answer:", examples[0].answer)"""),
        new_code_cell("""# Verbalization of image tokens: which word does each image patch turn into, by layer?
image_positions = batch.image_mask[0].nonzero().flatten()[None]
table = verbalize(lens.summarize(resid_stack_from_cache(cache, image_positions), k=1), vlm.tokenizer)
for layer, words in enumerate(table):
    print(layer, " ".join(words))"""),
        new_markdown_cell(GPU),
    ],
    "04_phase_diagram.ipynb": [
        new_markdown_cell(
            "# The full phase diagram\nThe three lenses over a dataset, the phases located, "
            "and the report. This is what `hooked-vllm phase-diagram` runs."
        ),
        new_code_cell(SETUP),
        new_code_cell("""import tempfile
from hooked_vllm.data.shapes_dataset import load_shapes
from hooked_vllm.experiment import ResultStore, run_phase_diagram
from hooked_vllm.report.html import write_report
out = tempfile.mkdtemp()
sample = load_shapes(f"{out}/images", n=16)
result = run_phase_diagram(vlm, sample, out, batch_size=8, progress=False)
for phase in result.aggregates["phases"]:
    print(phase["name"], phase["start"], phase["end"], phase["found"], "-", phase["evidence"])"""),
        new_code_cell("""from hooked_vllm.report import figures
rows, _ = ResultStore(out).read()
write_report(out, result.aggregates, rows, vlm.tokenizer, title="demo model on shapes")
figures.phase_diagram(result.aggregates)"""),
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
        new_code_cell(SETUP),
        new_code_cell("""from hooked_vllm.demo.shapes import Shape, render
from hooked_vllm.interventions import logit_diff, patch_by_modality
# Same question, the square red in one image and blue in the other.
red = render([Shape("square", "red", 40, 24, 6)])
blue = render([Shape("square", "blue", 40, 24, 6)])
question = ["what colour is the square ?"]
clean, corrupt = vlm.prepare([red], question), vlm.prepare([blue], question)
red_id, blue_id = vlm.tokenizer.convert_tokens_to_ids(["red", "blue"])
metric = logit_diff(corrupt, red_id, blue_id)
result = patch_by_modality(vlm, clean, corrupt, metric, groups=("image", "text", "last"))
print("clean", result.clean, "corrupt", result.corrupt)
print(result.effects.numpy().round(2))   # [layer, group]: where does the colour travel?"""),
        new_code_cell("""from hooked_vllm.interventions import knockout, knockout_sweep
print("image -> last blocked, windows of 2 layers:", knockout_sweep(vlm, clean, [("image", "last"), ("image", "text")],
      logit_diff(clean, red_id, blue_id), window=2).squeeze(-1).numpy().round(2))
with knockout(vlm, clean, edges=[("image", "text"), ("image", "last")]):
    print("all layers blocked:", vlm.generate(clean, max_new_tokens=1, return_str=True))"""),
        new_code_cell("""from hooked_vllm.interventions import pruning_curve
examples = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + 5, n=32, kinds=("colour", "shape"))
batch = vlm.prepare([ex.image for ex in examples], [ex.question for ex in examples])
for point in pruning_curve(vlm, batch, ks=[16, 8, 4, 2, 1], from_layers=[1, 3], method="norm"):
    print(point)"""),
        new_markdown_cell(GPU),
    ],
    "06_transformerlens_style.ipynb": [
        new_markdown_cell(
            "# TransformerLens style on a vision LLM\n"
            "Your TransformerLens code runs on `HookedVLM` as it is: string prompts, `test_prompt`, "
            "`transformer_lens.patching`, direct logit attribution, SAEs. What is new is the image: "
            "a `VLMBatch` carries it, and every position knows its modality."
        ),
        new_code_cell(SETUP),
        new_markdown_cell("## Text alone, exactly as in TransformerLens"),
        new_code_cell("""from transformer_lens import utilities as utils
print(vlm.to_str_tokens("what colour is the circle"))   # leading spaces kept, as TL does
utils.test_prompt("what colour is the", "circle", vlm)  # no image: the language model alone"""),
        new_markdown_cell(
            "## Activation patching with TransformerLens's own module\n"
            "Two images, one question. A `VLMBatch` answers `.shape` as its tokens would, so "
            "`get_act_patch_resid_pre` runs unchanged; the heatmap is layer x position, image "
            "positions first."
        ),
        new_code_cell("""import matplotlib.pyplot as plt
from transformer_lens import patching
from hooked_vllm.demo.shapes import Shape, render
question = ["what colour is the square ?"]
clean = vlm.prepare([render([Shape("square", "red", 40, 24, 6)])], question)
corrupt = vlm.prepare([render([Shape("square", "blue", 40, 24, 6)])], question)
red, blue = vlm.to_single_token("red"), vlm.to_single_token("blue")
_, clean_cache = vlm.run_with_cache(clean)
metric = lambda logits: logits[0, -1, red] - logits[0, -1, blue]
effect = patching.get_act_patch_resid_pre(vlm, corrupt, clean_cache, metric)   # [layer, pos]
labels = vlm.to_str_tokens(clean)
fig, ax = plt.subplots(figsize=(10, 3))
image = ax.imshow(effect.numpy(), cmap="RdBu", vmin=-effect.abs().max(), vmax=effect.abs().max(), aspect="auto")
ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
ax.set_ylabel("layer (resid_pre)"); ax.set_xlabel("position")
fig.colorbar(image, label="logit diff red - blue"); plt.show()"""),
        new_markdown_cell(
            "The colour sits in the one image patch that holds the square in the early layers, "
            "then moves to the last position."
        ),
        new_markdown_cell(
            "## Direct logit attribution, on image tokens too\n"
            "`hook_embed` holds what the residual stream starts from (the visual prefix at image "
            "positions), so the components sum to the residual everywhere; the cache applies the "
            "final norm's weight, so `logit_attrs` sums to the logit difference exactly."
        ),
        new_code_cell("""logits, cache = vlm.run_with_cache(clean)
stack, component_names = cache.decompose_resid(layer=-1, return_labels=True)
attrs = cache.logit_attrs(stack[:, :, -1], tokens=red, incorrect_tokens=blue, pos_slice=-1)[:, 0]
print("sum of attributions", float(attrs.sum()), "logit difference", float(metric(logits)))
square_patch = int(clean.image_mask[0].nonzero()[6])            # an image position
at_patch = cache.logit_attrs(stack[:, :, square_patch], tokens=red, incorrect_tokens=blue, pos_slice=square_patch)[:, 0]
fig, ax = plt.subplots(figsize=(8, 2.5))
ax.bar(range(len(component_names)), attrs.numpy(), label="last position")
ax.bar(range(len(component_names)), at_patch.numpy(), alpha=0.6, label=f"image position {square_patch}")
ax.set_xticks(range(len(component_names)), component_names, rotation=60, fontsize=7)
ax.set_ylabel("red - blue"); ax.legend(); plt.show()"""),
        new_markdown_cell(
            "## A sparse autoencoder on image positions\n"
            "We train a small SAE on the layer-2 residual at image positions (two minutes of "
            "reading would do the same with a published SAE: `SAE.load_from_disk(folder)` reads "
            "SAELens's `cfg.json` + `sae_weights.safetensors`), splice it in on image positions only, "
            "and read which feature fires on each patch."
        ),
        new_code_cell("""import tempfile
from hooked_vllm.sae import SAE, SAEConfig, run_with_cache_with_saes
hook = "blocks.2.hook_resid_post"
train = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + 77, n=256, kinds=("colour", "shape"))
train_batch = vlm.prepare([ex.image for ex in train], [ex.question for ex in train])
_, acts = vlm.run_with_cache(train_batch, names_filter=hook)
x = acts[hook][train_batch.image_mask]                         # [n_patches, d_model]
sae = SAE(SAEConfig(architecture="standard", d_in=x.shape[-1], d_sae=64, hook_name=hook))
with torch.enable_grad():
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(300):
        feats = sae.encode(x)
        loss = (sae.decode(feats) - x).pow(2).sum(-1).mean() + 3e-3 * feats.abs().sum(-1).mean()
        optimizer.zero_grad(); loss.backward(); optimizer.step()
print("fraction of variance unexplained:", float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()))
folder = sae.save_to_disk(tempfile.mkdtemp())                  # SAELens's format
sae = SAE.load_from_disk(folder)"""),
        new_code_cell("""logits_with, cache = run_with_cache_with_saes(vlm, clean, saes=[sae], positions="image", use_error_term=True,
                                             names_filter=f"{hook}.hook_sae_acts_post")
print("logits unchanged with the error term:", torch.allclose(logits_with, vlm(clean), atol=1e-5))
features = cache[f"{hook}.hook_sae_acts_post"][0][clean.image_mask[0]]    # [16 patches, 64 features]
top = features.argmax(-1).reshape(4, 4)
strength = features.max(-1).values.reshape(4, 4)
fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3))
left.imshow(render([Shape("square", "red", 40, 24, 6)])); left.set_title("image")
right.imshow(strength.numpy(), cmap="viridis"); right.set_title("top SAE feature per patch")
for (r, c), f in zip([(r, c) for r in range(4) for c in range(4)], top.flatten().tolist()):
    right.text(c, r, f, ha="center", va="center", color="white", fontsize=8)
plt.show()"""),
        new_markdown_cell(GPU),
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        notebook = new_notebook(
            cells=cells,
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        )
        nbformat.write(notebook, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
