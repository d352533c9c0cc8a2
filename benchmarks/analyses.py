"""The three-lens analysis: one-pass collector against a plain HF forward, the norm-based attention
against a naive reference, and peak memory of the collector against run_with_cache of everything.

    python benchmarks/analyses.py [--batch 1] [--repeats 3]

Mid-size random LLaVA (8 layers x 512, 628 positions of which 576 image), float32, CPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT, interleaved_times, mid_llava, peak_memory_mb, sample_images  # noqa: E402

from hooked_vllm import HookedVLM  # noqa: E402
from hooked_vllm.analysis import collect, head_norms, head_summed_norms  # noqa: E402


def naive_norm_attention(pattern, v, w_o, chunk=16):
    """The definition, materialised: alpha_hij f_h(x_j) as vectors, query chunk by query chunk."""
    repeat = w_o.shape[0] // v.shape[2]
    f = torch.einsum("bkhd,hde->bhke", v.float().repeat_interleave(repeat, dim=2), w_o.float())
    per_head, summed = [], []
    for start in range(0, pattern.shape[2], chunk):
        vectors = pattern[:, :, start : start + chunk, :, None].float() * f[:, :, None]
        per_head.append(vectors.norm(dim=-1))
        summed.append(vectors.sum(1).norm(dim=-1))
    return torch.cat(per_head, 2), torch.cat(summed, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    hf_model, processor = mid_llava()
    reference = copy.deepcopy(hf_model)
    vlm = HookedVLM.from_hf(hf_model, processor)
    batch = vlm.prepare(sample_images(args.batch), [PROMPT] * args.batch)
    hf_inputs = {**batch.inputs, "position_ids": batch.position_ids}
    _, cache = vlm.run_with_cache(batch, names_filter=["blocks.3.attn.hook_pattern", "blocks.3.attn.hook_v"])
    pattern, v, w_o = cache["blocks.3.attn.hook_pattern"], cache["blocks.3.attn.hook_v"], vlm.W_O[3]

    def ours():
        return head_norms(pattern, v, w_o), head_summed_norms(pattern, v, w_o)

    naive_head, naive_summed = naive_norm_attention(pattern, v, w_o)
    our_head, our_summed = ours()
    rel = max(
        ((our_head - naive_head).abs().max() / naive_head.abs().max()).item(),
        ((our_summed - naive_summed).abs().max() / naive_summed.abs().max()).item(),
    )

    times = interleaved_times(
        {
            "hf_forward": lambda: reference(**hf_inputs),
            "collect (3 lenses, 1 pass)": lambda: collect(vlm, batch),
            "collect, pattern hooks": lambda: collect(vlm, batch, attention="pattern"),
            "run_with_cache(all)": lambda: vlm.run_with_cache(batch),
            "norm attention, ours (1 layer)": ours,
            "norm attention, naive (1 layer)": lambda: naive_norm_attention(pattern, v, w_o),
        },
        repeats=args.repeats,
    )
    memory = {
        "hf_forward": peak_memory_mb(lambda: reference(**hf_inputs)),
        "collect (3 lenses, 1 pass)": peak_memory_mb(lambda: collect(vlm, batch)),
        "collect, pattern hooks": peak_memory_mb(lambda: collect(vlm, batch, attention="pattern")),
        "run_with_cache(all)": peak_memory_mb(lambda: vlm.run_with_cache(batch)),
        "norm attention, ours (1 layer)": peak_memory_mb(ours),
        "norm attention, naive (1 layer)": peak_memory_mb(lambda: naive_norm_attention(pattern, v, w_o)),
    }
    n_tokens = batch.input_ids.shape[1]
    print(
        f"mid-size LLaVA: {vlm.cfg.n_layers} layers x {vlm.cfg.d_model}, {vlm.cfg.n_heads} heads, "
        f"{n_tokens} positions ({int(batch.image_mask[0].sum())} image), batch {args.batch}, CPU"
    )
    print(f"{'':34s} {'ms':>9s} {'peak MiB':>9s}")
    for name, seconds in times.items():
        print(f"{name:34s} {seconds * 1000:9.1f} {memory[name]:9.0f}")
    base = times["hf_forward"]
    print(
        f"collector / HF forward:            {times['collect (3 lenses, 1 pass)'] / base:.2f}x (goal <= 1.3x)"
    )
    print(f"run_with_cache(all) / HF forward:  {times['run_with_cache(all)'] / base:.2f}x")
    speedup = times["norm attention, naive (1 layer)"] / times["norm attention, ours (1 layer)"]
    print(f"norm attention naive / ours:       {speedup:.1f}x faster (goal >= 20x), max rel diff {rel:.1e}")
    mem_ratio = memory["run_with_cache(all)"] / max(memory["collect (3 lenses, 1 pass)"], 1)
    print(f"peak memory run_with_cache(all) / collector: {mem_ratio:.1f}x")


if __name__ == "__main__":
    main()
