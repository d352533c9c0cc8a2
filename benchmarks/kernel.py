"""The norm-based attention reduction of one layer from q and k: Triton kernel against the PyTorch
path, at real shapes, side by side in one run (round-robin).

    python benchmarks/kernel.py --shape 7b --batch 8 --dtype float16     # on a GPU: both paths
    python benchmarks/kernel.py --shape mid --batch 1 --device cpu       # PyTorch path only

Prints the time of each path and the largest relative difference between them (the kernel must
equal the PyTorch path to 1e-3 relative), for query groups laid out as the collector's: 576 image
positions, the instruction, the last position. The model's own attention (sdpa) is timed beside
them for scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_times  # noqa: E402

from hooked_vllm.analysis.attention_lenses import attention_group_sums  # noqa: E402
from hooked_vllm.analysis.norm_attention import head_gram  # noqa: E402
from hooked_vllm.kernels import attention_lenses as kernel  # noqa: E402

SHAPES = {"7b": (32, 128, 4096), "mid": (8, 64, 512)}  # heads, d_head, d_model
POSITIONS, IMAGE = 607, range(5, 581)  # LLaVA-1.5: template, 576 image tokens, instruction


def inputs(shape: str, batch: int, device: str, dtype: torch.dtype):
    heads, d_head, d_model = SHAPES[shape]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(batch, heads, POSITIONS, d_head, generator=gen).to(device, dtype)
    k = torch.randn(batch, heads, POSITIONS, d_head, generator=gen).to(device, dtype)
    v = torch.randn(batch, POSITIONS, heads, d_head, generator=gen).to(device, dtype)
    w_o = (torch.randn(heads, d_head, d_model, generator=gen) / d_model**0.5).to(device, dtype)
    groups = torch.zeros(batch, 3, POSITIONS, device=device)
    groups[:, 0, IMAGE.start : IMAGE.stop] = 1  # image
    groups[:, 1, IMAGE.stop : POSITIONS - 5] = 1  # instruction
    groups[:, 2, POSITIONS - 1] = 1  # last position
    return q, k, v, head_gram(v, w_o), groups


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    q, k, v, gram, groups = inputs(args.shape, args.batch, args.device, dtype)
    scaling = q.shape[-1] ** -0.5
    paths = {"torch": lambda: attention_group_sums(q, k, gram, groups, scaling=scaling, backend="torch")}
    if kernel.can_run(q):
        paths["triton"] = lambda: attention_group_sums(q, k, gram, groups, scaling=scaling, backend="triton")

    def attention():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True)

    print(
        f"{args.shape}: batch {args.batch}, {q.shape[1]} heads x {q.shape[-1]}, {POSITIONS} positions, "
        f"{args.device}, {args.dtype}, torch {torch.__version__}"
    )
    times = interleaved_times(
        {"sdpa attention (for scale)": attention, **{f"group sums, {n}": fn for n, fn in paths.items()}},
        args.repeats,
        args.device,
    )
    base = times.pop("sdpa attention (for scale)")
    print(f"  {'sdpa attention (for scale)':30s} {base * 1000:8.2f} ms")
    for name, seconds in times.items():
        print(f"  {name:30s} {seconds * 1000:8.2f} ms  {seconds / base:6.2f}x sdpa")
    results = {name: fn() for name, fn in paths.items()}
    if "triton" in results:
        worst = max(
            float((a - b).abs().max() / b.abs().max())
            for a, b in zip(results["triton"], results["torch"], strict=True)
        )
        print(f"  triton vs torch: max relative difference {worst:.1e} (must be <= 1e-3)")
    else:
        print(
            "  triton: needs a CUDA device (CI checks it in Triton's CPU interpreter: "
            "tests/test_attention_lenses.py)"
        )


if __name__ == "__main__":
    main()
