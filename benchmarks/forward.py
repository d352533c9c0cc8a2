"""Hooked forward and run_with_cache against a plain HF forward of the same mid-size random LLaVA.

    python benchmarks/forward.py [--batch 1] [--repeats 5]

Prints seconds and ratios over the HF forward (eager attention, float32, CPU unless --device).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT, interleaved_times, mid_llava, sample_images  # noqa: E402

from hooked_vllm import HookedVLM  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    hf_model, processor = mid_llava()
    reference = copy.deepcopy(hf_model).to(args.device)
    vlm = HookedVLM.from_hf(hf_model.to(args.device), processor)
    batch = vlm.prepare(sample_images(args.batch), [PROMPT] * args.batch).to(args.device)
    hf_inputs = {**batch.inputs, "position_ids": batch.position_ids}
    resid_only = [f"blocks.{layer}.hook_resid_post" for layer in range(vlm.cfg.n_layers)]

    times = interleaved_times(
        {
            "hf_forward": lambda: reference(**hf_inputs),
            "hooked_forward": lambda: vlm(batch),
            "run_with_cache(resid_post)": lambda: vlm.run_with_cache(batch, names_filter=resid_only),
            "run_with_cache(all)": lambda: vlm.run_with_cache(batch),
        },
        repeats=args.repeats,
    )
    n_tokens = batch.input_ids.shape[1]
    print(
        f"mid-size LLaVA: {vlm.cfg.n_layers} layers x d_model {vlm.cfg.d_model}, {n_tokens} positions "
        f"({int(batch.image_mask[0].sum())} image), batch {args.batch}, {args.device}, "
        f"torch {torch.__version__}"
    )
    base = times["hf_forward"]
    for name, seconds in times.items():
        print(f"{name:28s} {seconds * 1000:9.1f} ms   {seconds / base:5.2f}x HF")


if __name__ == "__main__":
    main()
