"""The measurements behind demo-phases' model card: the phase curves of the model after each training
stage, side by side, and the phases on disjoint item sets.

    python tools/demo_phases_figures.py --stages-dir STAGES --n 512 --seeds 0 1 \\
        --figure hooked_vllm/demo/phases/stages.png --json hooked_vllm/demo/phases/stages.json

``STAGES`` holds ``stage1-text``, ``stage2-alignment`` and ``stage3-instruction`` as
``python -m hooked_vllm.demo.train_phases --stages-dir STAGES`` writes them. Each stage is run through
the main job's own pipeline (``run_phase_diagram`` on the shapes dataset, ``--seed`` s giving a
disjoint sample per seed) and its phases located by the unchanged rules of ``analysis/phases.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hooked_vllm.model import HookedVLM  # noqa: E402
from hooked_vllm.runs.datasets import DatasetSample  # noqa: E402
from hooked_vllm.runs.phase_diagram import run_phase_diagram  # noqa: E402
from hooked_vllm.runs.shapes_dataset import load_shapes  # noqa: E402

STAGES = ("stage1-text", "stage2-alignment", "stage3-instruction")
TITLES = {
    "stage1-text": "after text pretraining",
    "stage2-alignment": "after alignment",
    "stage3-instruction": "after instruction tuning",
}
COLOURS = {"intra_image": "tab:orange", "intra_text": "tab:green", "inter": "tab:blue"}
SHADES = ("#dde8f5", "#f5e6dd", "#e0f2dd", "#eeeeee")


def _key(item) -> tuple[str, str]:
    return hashlib.sha256(item.image_path.read_bytes()).hexdigest(), item.instruction


def samples(directory: Path, n: int, seeds: list[int]) -> dict[int, DatasetSample]:
    """The shapes sample of each seed (the main job's ``--seed``), each without the items of the
    seeds before it (an image drawn again with the same question), so the sets are disjoint."""
    seen: set[tuple[str, str]] = set()
    out = {}
    for seed in seeds:
        sample = load_shapes(directory / f"images-{seed}", n=n, seed=seed)
        items = [item for item in sample.items if _key(item) not in seen]
        seen |= {_key(item) for item in items}
        out[seed] = DatasetSample(f"shapes-{seed}", items)
        print(f"seed {seed}: {len(items)} of {n} items (the rest are in an earlier seed's set)", flush=True)
    return out


def measure(model_dir: Path, sample: DatasetSample, seed: int, batch_size: int = 32) -> dict:
    vlm = HookedVLM.from_pretrained(str(model_dir))
    with tempfile.TemporaryDirectory() as out:
        start = time.time()
        result = run_phase_diagram(vlm, sample, Path(out) / "run", batch_size=batch_size, progress=False)
        seconds = time.time() - start
    agg = result.aggregates
    ctx = agg["contextualization"]
    curves = {g: ctx[g]["adjusted_mean"] for g in ("intra_image", "intra_text", "inter")}
    bands = {g: ctx[g]["adjusted_ci95"] for g in ("intra_image", "intra_text", "inter")}
    return {
        "model": str(model_dir),
        "seed": seed,
        "n_items": agg["n_items"],
        "seconds": round(seconds, 1),
        "curves": curves,
        "ci95": bands,
        "kl_to_final": agg["logit_lens"]["kl_to_final"]["mean"],
        "phases": agg["phases"],
    }


def plot(results: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(
        2,
        len(results),
        figsize=(4.2 * len(results), 5.6),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1.2]},
    )
    axes = np.asarray(axes).reshape(2, -1)
    for col, (stage, r) in enumerate(results.items()):
        ax, kl_ax = axes[0, col], axes[1, col]
        layers = np.arange(len(r["curves"]["inter"]))
        for i, phase in enumerate(r["phases"]):
            if phase["found"]:
                for a in (ax, kl_ax):
                    a.axvspan(phase["start"], phase["end"], color=SHADES[i], zorder=0)
                ax.text(
                    (phase["start"] + phase["end"]) / 2,
                    1.0,
                    "I II III IV".split()[i],
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontsize=9,
                )
        for group, colour in COLOURS.items():
            mean, band = np.array(r["curves"][group]), np.array(r["ci95"][group])
            ax.plot(layers, mean, color=colour, lw=1.5, label=group.replace("_", "-"))
            ax.fill_between(layers, mean - band, mean + band, color=colour, alpha=0.25, lw=0)
        found = [p["name"] for p in r["phases"] if p["found"]]
        ax.set_title(f"{TITLES.get(stage, stage)}\n{len(found)} of 4 phases found", fontsize=10, pad=14)
        kl_ax.plot(layers, r["kl_to_final"], "k.-", lw=1)
        kl_ax.axhline(1.0, color="0.5", ls=":", lw=1)
        kl_ax.set_yscale("log")
        kl_ax.set_xlabel("stream layer (0 = embedding)")
        if col == 0:
            ax.set_ylabel("contextualization\n(adjusted cosine)")
            kl_ax.set_ylabel("logit lens\nKL to final")
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"demo-phases on shapes ({r['n_items']} held-out items, seed {r['seed']}; 95% bands)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages-dir", type=Path, required=True)
    parser.add_argument("--stages", nargs="+", default=list(STAGES))
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    work = tempfile.TemporaryDirectory()
    by_seed = samples(Path(work.name), args.n, args.seeds)
    for stage in args.stages:
        for seed in args.seeds:
            r = measure(args.stages_dir / stage, by_seed[seed], seed)
            results.setdefault(stage, []).append(r)
            width = float(np.mean(r["ci95"]["inter"]))
            print(
                f"{stage} seed {seed}: {r['n_items']} items in {r['seconds']} s; "
                f"mean 95% half-width of inter {width:.4f}",
                flush=True,
            )
            for p in r["phases"]:
                where = f"layers {p['start']}-{p['end']}" if p["found"] else "not found"
                print(f"  {p['name']:22s} {where:14s} {p['evidence']}", flush=True)
            print("  inter " + " ".join(f"{v:.3f}" for v in r["curves"]["inter"]))
            intra = (np.array(r["curves"]["intra_image"]) + np.array(r["curves"]["intra_text"])) / 2
            print("  intra " + " ".join(f"{v:.3f}" for v in intra))
            print("  KL    " + " ".join(f"{v:.2f}" for v in r["kl_to_final"]))
    if args.figure:
        plot({stage: runs[0] for stage, runs in results.items()}, args.figure)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
