"""The ``hooked-vllm`` command.

    hooked-vllm phase-diagram                       # demo model + embedded data, offline, ~1 min on CPU
    hooked-vllm phase-diagram --model llava-hf/llava-1.5-7b-hf --dataset coco \\
        --data-dir /data/coco --n 500 --batch-size 8 --device cuda --dtype float16 --out runs/llava-coco
    torchrun --nproc-per-node 4 -m hooked_vllm.cli phase-diagram ...   # data parallel

A run writes ``items/`` (per-item results, resumable), ``aggregates.json``/``.csv``, ``report.html``
and PNGs into ``--out``. Run the same command again after an interruption to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEMO = "demo"
#: settings added after runs were made with earlier versions: their value in those runs
ADDED_SETTINGS = {"no_verbalize_images": "False"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hooked-vllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "phase-diagram", help="contextualization, norm-based attention and logit lens -> phases"
    )
    run.add_argument(
        "--model", default=DEMO, help="hub id or local directory (default: the shipped demo model)"
    )
    run.add_argument(
        "--dataset",
        default=None,
        choices=["coco", "winoground", "samples", "shapes"],
        help="default: shapes for the demo model, else samples (photos shipped with the package)",
    )
    run.add_argument("--data-dir", type=Path, default=None)
    run.add_argument("--n", type=int, default=None, help="number of images/examples to sample (default: all)")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--out", type=Path, default=Path("phase-diagram-out"))
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    run.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    run.add_argument("--device-map", default=None, help="split one model over GPUs, e.g. 'auto'")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers (image decoding and the processor)"
    )
    run.add_argument(
        "--no-verbalize-images",
        action="store_true",
        help="skip the logit lens of every image position at every layer (the verbalization table): "
        "at 7B it costs about half a forward pass",
    )
    run.add_argument("--skip-bad", action="store_true", help="skip missing/corrupt images and list them")
    run.add_argument("--no-progress", action="store_true")
    return parser


def _load_model(args):
    from hooked_vllm import HookedVLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == DEMO:
        from hooked_vllm.demo import MODEL_DIR

        if (MODEL_DIR / "model.safetensors").is_file():
            return HookedVLM.from_pretrained(str(MODEL_DIR), dtype=DTYPES[args.dtype], device=device), None
        from hooked_vllm.testing import tiny_llava

        warning = "UNTRAINED DEMO MODEL: random weights, so these curves are noise, not findings."
        return HookedVLM.from_hf(*tiny_llava(seed=args.seed)), warning
    vlm = HookedVLM.from_pretrained(
        args.model,
        dtype=DTYPES[args.dtype],
        device=None if args.device_map else device,
        device_map=args.device_map,
    )
    return vlm, None


def _load_data(args):
    from hooked_vllm.data.datasets import load_dataset

    name = args.dataset or ("shapes" if args.model == DEMO else "samples")
    if name == "shapes":
        from hooked_vllm.data.shapes_dataset import load_shapes

        return load_shapes(args.out / "shapes-images", n=args.n or 16, seed=args.seed)
    return load_dataset(name, args.data_dir, n=args.n, seed=args.seed, skip_bad=args.skip_bad)


def phase_diagram(args) -> int:
    from hooked_vllm.experiment import ResultStore, run_phase_diagram
    from hooked_vllm.report.html import write_report

    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {k: str(v) for k, v in vars(args).items() if k not in ("no_progress", "command", "workers")}
    manifest_path = args.out / "run.json"
    if manifest_path.is_file() and (args.out / "items").is_dir():
        previous = {**ADDED_SETTINGS, **json.loads(manifest_path.read_text())}
        if previous != manifest:
            changed = sorted(k for k in manifest if previous.get(k) != manifest[k])
            print(
                f"error: {args.out} holds a run with other settings ({', '.join(changed)} differ). "
                "Use another --out, or the same settings to resume it.",
                file=sys.stderr,
            )
            return 2
    sample = _load_data(args)
    if not sample.items:
        print("error: the dataset sample is empty (after skipping bad images).", file=sys.stderr)
        return 2
    vlm, warning = _load_model(args)
    rank = int(os.environ.get("RANK", 0))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if rank == 0:
        manifest_path.write_text(json.dumps(manifest, indent=1))
    result = run_phase_diagram(
        vlm,
        sample,
        args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        verbalize_images=not args.no_verbalize_images,
        progress=not args.no_progress,
    )
    if result is None:
        return 0
    rows, _ = ResultStore(args.out).read()
    title = f"{args.model} on {sample.name} ({result.n_items} items)"
    report = write_report(args.out, result.aggregates, rows, vlm.tokenizer, title=title, warning=warning)
    for phase in result.aggregates["phases"]:
        where = f"layers {phase['start']}-{phase['end']}" if phase["found"] else "not found"
        print(f"  {phase['name']:22s} {where:14s} {phase['evidence']}")
    for path, reason in sample.skipped:
        print(f"  skipped {path}: {reason}")
    if warning:
        print(f"  NOTE: {warning}")
    print(f"wrote {report}, {args.out / 'aggregates.json'}, {args.out / 'phase_diagram.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "phase-diagram":
        return phase_diagram(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
