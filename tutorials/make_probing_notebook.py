"""The cells of tutorials/07_probing.ipynb. After editing one, regenerate and re-execute it with
`python tutorials/make_notebooks.py --execute 07_probing` (or `python tutorials/make_probing_notebook.py
--execute`, the same).

The notebook runs top to bottom on the shipped demo model on a CPU (tests/test_tutorials.py runs it in
CI): it stores image-position activations of 2,000 held-out shapes images at every layer with the
activation store, trains a linear probe per layer for the colour and the shape of each patch, and
plots probe accuracy against depth.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from nbformat.v4 import new_code_cell, new_markdown_cell

HERE = Path(__file__).parent


def _make_notebooks():
    """tutorials/make_notebooks.py (loaded by its path: tutorials/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_notebooks", HERE / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CELLS = [
    new_markdown_cell(
        "# Probing: where does the visual information live?\n"
        "We store the activations of every image position at every layer (the vision tower, the "
        "projector's output and each language-model layer) for 2,000 held-out images with "
        "`ActivationStore`, then train one linear probe per layer. The synthetic shapes task knows "
        "the ground truth of each of the 4 x 4 image patches: the colour and the shape of the object "
        "it holds (`shapes.patch_labels`), and how many objects the whole image has."
    ),
    new_code_cell(
        _make_notebooks().QUIET
        + """
import tempfile
import time
from pathlib import Path

import torch
import transformers
from hooked_vllm import HookedVLM
from hooked_vllm.activations.store import ActivationStore
from hooked_vllm.runs.datasets import DatasetItem, DatasetSample
from hooked_vllm.demo import demo_model_dir, shapes

transformers.logging.set_verbosity_error()  # nor Hugging Face's log lines
torch.set_grad_enabled(False)

vlm = HookedVLM.from_pretrained(str(demo_model_dir()))
N = 2000
examples = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + 20_000, n=N)  # never seen in training
folder = Path(tempfile.mkdtemp())
items = []
for i, example in enumerate(examples):  # your own images: any DatasetItem list works
    example.image.save(folder / f"shapes-{i:05d}.png")
    items.append(DatasetItem(f"shapes-{i:05d}", folder / f"shapes-{i:05d}.png", example.question))
print(len(items), "images;", vlm.cfg.n_layers, "LM layers;", examples[0].question)"""
    ),
    new_markdown_cell(
        "## Store every layer at the image positions\n"
        "One row per (image, image position), one column per hook. The vision tower's patches map 1:1 "
        "to LLaVA's image positions (the CLS token is dropped, as the projector drops it), so all ten "
        "hooks share the rows. The size is estimated and printed before anything runs; running the "
        "same call again resumes (here: nothing left to do)."
    ),
    new_code_cell("""import contextlib
import sys

HOOKS = (
    [f"vision.blocks.{layer}.hook_resid_post" for layer in range(3)]
    + ["hook_visual_prefix"]
    + [f"blocks.{layer}.hook_resid_post" for layer in range(vlm.cfg.n_layers)]
)
NAMES = (
    [f"vision {layer}" for layer in range(3)]
    + ["projector"]
    + [f"LM {layer}" for layer in range(vlm.cfg.n_layers)]
)
path = folder / "store"
sample = DatasetSample("shapes", items)
settings = dict(hooks=HOOKS, positions="image", dtype="float16", batch_size=64, progress=False)
with contextlib.redirect_stderr(sys.stdout):  # the size estimate goes to stderr: show it here
    start = time.perf_counter()
    store = ActivationStore.write(vlm, sample, path, **settings)
    print(f"{time.perf_counter() - start:.1f} s:", store)
    store = ActivationStore.write(vlm, sample, path, **settings)  # resumes: all done"""),
    new_markdown_cell(
        "The folder is a Hugging Face `datasets` dataset (Arrow shards, memory-mapped), ready for a "
        "training loop; `ActivationStore` adds random access by row and by item in the stored dtype."
    ),
    new_code_cell("""import datasets

ds = datasets.load_from_disk(str(path))
print(ds)
loader = torch.utils.data.DataLoader(
    ds.with_format("torch", columns=["blocks.3.hook_resid_post"]), batch_size=4096, shuffle=True
)
print("a training batch:", next(iter(loader))["blocks.3.hook_resid_post"].shape)
one = store.item(
    "shapes-00000", columns=["token", "patch", "grid_row", "grid_col", "blocks.3.hook_resid_post"]
)
print(
    one["token"][:5],
    one["grid_row"][:5].tolist(),
    one["grid_col"][:5].tolist(),
    one["blocks.3.hook_resid_post"].dtype,
)"""),
    new_markdown_cell(
        "## Labels and a train/test split by image\n"
        "Colour and shape are probed on the patches that hold an object (5 colours, 3 shapes); the "
        "number of objects (one or two) on every patch: a patch has to look beyond itself to know it. "
        "The first 80% of the images train the probes, the rest test them."
    ),
    new_code_cell("""labels = torch.tensor(
    [shapes.patch_labels(example.scene) for example in examples]
)  # [image, colour|shape, patch]
count = torch.tensor([len(example.scene) for example in examples])
meta = store.rows(slice(None), columns=["item_index", "patch"])
colour = labels[meta["item_index"], 0, meta["patch"]]
kind = labels[meta["item_index"], 1, meta["patch"]]
n_objects = count[meta["item_index"]]
test = meta["item_index"] >= int(0.8 * N)
objects = colour > 0
print(f"{len(store):,} rows; {int(objects.sum()):,} patches hold an object")"""),
    new_code_cell("""from hooked_vllm.analysis.probing import linear_probe

results = {"colour": [], "shape": [], "count": []}
for hook in HOOKS:
    x = store.rows(slice(None), columns=[hook])[hook].float()
    for target, y, rows in (
        ("colour", colour, objects),
        ("shape", kind, objects),
        ("count", n_objects, torch.ones_like(objects)),
    ):
        train, held_out = rows & ~test, rows & test
        results[target].append(linear_probe(x[train], y[train], x[held_out], y[held_out]))
print(f"{'layer':10s}" + "".join(f"{t:>16s}" for t in results))
for i, name in enumerate(NAMES):
    print(f"{name:10s}" + "".join(f"{r[i].accuracy:9.3f} ({r[i].chance:.2f})" for r in results.values()))"""),
    new_code_cell("""import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(8, 3.5))
for (target, rs), colour_ in zip(results.items(), ["tab:red", "tab:blue", "tab:green"]):
    ax.plot(range(len(NAMES)), [r.accuracy for r in rs], "o-", color=colour_, label=f"{target} probe")
    ax.plot(range(len(NAMES)), [r.chance for r in rs], ":", color=colour_, label=f"{target} chance")
ax.axvspan(-0.5, 2.5, color="0.9")
ax.axvline(3.5, color="0.6", lw=0.8)
ax.set_xticks(range(len(NAMES)), NAMES, rotation=30)
ax.set_ylim(0, 1.05)
ax.set_ylabel("held-out accuracy")
ax.set_title("Linear probes at the image positions, by depth (grey: vision tower)")
ax.legend(fontsize=7, ncol=3, loc="lower left")
plt.tight_layout()
plt.show()"""),
    new_markdown_cell(
        "Reading the plot: each patch's colour and shape are linearly readable everywhere, from the "
        "first vision layer (a 16-pixel patch holds the whole object) through the projector and every "
        "language-model layer: the image positions keep their local content all the way up. How many "
        "objects the *image* holds is a global fact: the vision tower's attention gathers it layer by "
        "layer, the projector keeps less of it linearly readable, and the language model's image "
        "positions win back only a little (they attend causally: a patch cannot see the patches after "
        "it). The checks below are what CI asserts on this run."
    ),
    new_code_cell("""for target in ("colour", "shape"):
    for name, r in zip(NAMES, results[target]):
        assert r.accuracy > max(0.9, r.chance + 0.3), (target, name, r)
vision_count = results["count"][2]
assert vision_count.accuracy > vision_count.chance + 0.2, vision_count
print("every layer beats chance by a wide margin on colour and shape; the last vision layer reads the count")"""),
    new_markdown_cell(
        "## On the real models (GPU)\n"
        "The same store from the command line, resumable and data parallel:\n"
        "```\n"
        "hooked-vllm cache-activations --model llava-hf/llava-1.5-7b-hf --dataset coco --data-dir /data/coco \\\n"
        "    --num-items 5000 --hooks blocks.8.hook_resid_post blocks.16.hook_resid_post \\\n"
        "    vision.blocks.23.hook_resid_post hook_visual_prefix --positions image --store-dtype float16 \\\n"
        "    --device cuda --dtype float16 --batch-size 16 --out runs/llava-coco-acts\n"
        "torchrun --nproc-per-node 4 -m hooked_vllm.cli cache-activations ...   # 4 GPUs, one merged store\n"
        "```\n"
        "At 7B a row of these hooks is three 4,096-wide vectors and one 1,024-wide one, 26 KB in "
        "float16: 576 image positions x 5,000 images is about 77 GB. The command prints its estimate "
        "and refuses to start when the disk cannot hold it. InstructBLIP's image positions are its 32 Q-Former queries: store "
        "`qformer.blocks.{l}.hook_resid_post` there (its vision patches have no language-model "
        "position)."
    ),
]


def main() -> None:
    _make_notebooks().main(["07_probing.ipynb", *sys.argv[1:]])


if __name__ == "__main__":
    main()
