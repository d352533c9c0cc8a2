"""``hooked-vllm cache-activations``: store hook activations of a dataset as a ``datasets`` folder.

    hooked-vllm cache-activations --hooks blocks.3.hook_resid_post hook_visual_prefix --out store/
    hooked-vllm cache-activations --model llava-hf/llava-1.5-7b-hf --dataset coco --data-dir /data/coco \\
        --num-items 5000 --hooks blocks.12.hook_resid_post vision.blocks.23.hook_resid_post \\
        --positions image --store-dtype float16 --device cuda --dtype float16 --out runs/llava-acts
    torchrun --nproc-per-node 4 -m hooked_vllm.cli cache-activations ...   # data parallel

The estimated size is printed before anything is computed, and a run the disk cannot hold is refused.
Run the same command again after an interruption to resume. Read the result with
``datasets.load_from_disk(out)`` or ``hooked_vllm.activations.store.ActivationStore.open(out)``.
Every error is one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hooked_vllm.activations.constants import POSITIONS, STORAGE_DTYPES
from hooked_vllm.cli.common import (
    DEMO,
    DTYPES,
    UsageError,
    add_item_flags,
    add_run_flags,
    check_data_dir,
    join_ranks,
    load_data,
    load_model,
    non_negative_int,
    positive_int,
    resolve_device,
    resolve_model,
)
from hooked_vllm.runs.constants import CAPTION_INSTRUCTION
from hooked_vllm.runs.constants import READS_DATA_DIR as RUNS_READ_DATA_DIR

DATASETS = ("coco", "winoground", "shapes", "folder", "samples")
READS_DATA_DIR = (*RUNS_READ_DATA_DIR, "folder")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``cache-activations`` subcommand to ``hooked-vllm``'s subparsers."""

    run = subparsers.add_parser(
        "cache-activations",
        help="store hook activations per (item, position) as a Hugging Face datasets folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--model",
        default=DEMO,
        help="hub id or local directory (families with a fixed number of image tokens per image: "
        "LLaVA-1.5, InstructBLIP, Gemma 3, PaliGemma; default: the demo model)",
    )
    run.add_argument(
        "--dataset", default=None, choices=DATASETS, help="default: shapes for the demo model, else samples"
    )
    run.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the coco or winoground folder, or an image folder (required for those)",
    )
    run.add_argument(
        "--prompt", default=None, help=f"the instruction for --dataset folder ({CAPTION_INSTRUCTION!r})"
    )
    run.add_argument(
        "--hooks",
        nargs="+",
        required=True,
        metavar="HOOK",
        help="hook names: blocks.{l}.hook_resid_post, hook_visual_prefix, vision.blocks.{l}.hook_resid_post, "
        "qformer.blocks.{l}.hook_resid_post, ...",
    )
    run.add_argument(
        "--positions", default="image", choices=POSITIONS, help="which rows to store (default: image)"
    )
    run.add_argument(
        "--store-dtype",
        default=None,
        choices=STORAGE_DTYPES,
        help="dtype of the stored vectors (default: the model's; float32 for bfloat16)",
    )
    run.add_argument(
        "--num-items",
        "--n",
        dest="n",
        type=positive_int,
        default=None,
        help="number of images/examples (default: all; 16 for shapes). Under torchrun use --num-items",
    )
    run.add_argument("--batch-size", type=positive_int, default=8, help="items per forward pass (default: 8)")
    run.add_argument(
        "--padding-side",
        default="left",
        choices=["left", "right"],
        help="padding of batched prompts (results do not depend on it; default: left)",
    )
    run.add_argument(
        "--out",
        type=Path,
        default=Path("activations-out"),
        help="the store's folder; a rerun resumes it (default: activations-out)",
    )
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    run.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="the model's dtype (default: float32)"
    )
    run.add_argument(
        "--device-map",
        default=None,
        help="split one model over GPUs, e.g. 'auto' (default: none, the whole model on --device)",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the item sample (default: 0)")
    run.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers (default: 0)")
    add_item_flags(run)
    run.add_argument(
        "--repair", action="store_true", help="set bad shards aside (quarantine/) and recompute them"
    )
    run.add_argument(
        "--allow-weight-mismatch", action="store_true", help="load a mismatched checkpoint anyway"
    )
    add_run_flags(run)
    return run


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as values (paths resolved, defaults filled in), checked before any write."""
    from hooked_vllm.activations.layout import check_positions

    check_positions(args.hooks, args.positions)  # before the model loads

    dataset = args.dataset or ("shapes" if args.model == DEMO else "samples")
    check_data_dir(args.data_dir, dataset, READS_DATA_DIR)
    if args.prompt is not None and dataset != "folder":
        raise UsageError(
            f"--prompt is for --dataset folder; the {dataset} dataset brings its own instructions."
        )
    return {
        "model": resolve_model(args.model),
        "dataset": dataset,
        "data_dir": str(args.data_dir.resolve()) if args.data_dir is not None else None,
        "prompt": args.prompt,
        "n": args.n,
        "seed": args.seed,
        "device": None if args.device_map else resolve_device(args.device),
        "device_map": args.device_map,
        "model_dtype": args.dtype,
        "skip_bad": args.skip_bad,
        "max_pixels": args.max_pixels,
        "hooks": list(args.hooks),
        "positions": args.positions,
        "dtype": args.store_dtype or (args.dtype if args.dtype in STORAGE_DTYPES else "float32"),
        "batch_size": args.batch_size,
        "padding_side": args.padding_side,
    }


def _precheck(out: Path, rank: int, settings: dict[str, Any]) -> None:
    """Refuse early (before the model loads) a folder that holds other settings or is being written."""
    import json

    from hooked_vllm.activations.shards import SHARD_NAME
    from hooked_vllm.runs.store import (
        ACTIVATIONS_KIND,
        FolderLock,
        SettingsMismatchError,
        check_kind,
        settings_differences,
    )

    if not out.is_dir():
        return
    check_kind(out, ACTIVATIONS_KIND)  # a phase-diagram folder: refused before its run.json is touched
    if rank == 0 and (out / "run.json").is_file() and any(SHARD_NAME.match(p.name) for p in out.iterdir()):
        try:
            previous = json.loads((out / "run.json").read_text())
        except json.JSONDecodeError:
            return  # the store's own check reports it
        changed = settings_differences({k: previous.get(k) for k in settings}, settings)
        if changed:
            raise SettingsMismatchError(
                f"{out} holds activations stored with other settings ({', '.join(changed)} differ). Use "
                "another --out, or the same settings to resume it."
            )
    FolderLock(out, rank).check_free()  # raises RunLockedError naming the holder; writes nothing


def run(args: argparse.Namespace) -> int:
    """Run ``hooked-vllm cache-activations``; errors are raised as HookedVLMError (one line in main)."""

    from hooked_vllm.activations.store import ActivationStore
    from hooked_vllm.runs.datasets import load_folder

    settings = settings_of(args)
    rank, world = join_ranks(settings["device"], args.rendezvous_timeout)
    _precheck(args.out, rank, settings)
    if settings["dataset"] == "folder":
        sample = load_folder(
            args.data_dir,
            args.n,
            args.seed,
            instruction=args.prompt or CAPTION_INSTRUCTION,
            skip_bad=args.skip_bad,
            max_pixels=args.max_pixels,
        )
    else:
        sample = load_data(args, settings)
    if not sample.items:
        raise UsageError("The dataset sample is empty (after skipping bad images). Check --data-dir.")
    vlm, warning = load_model(args, settings)
    store = ActivationStore.write(
        vlm,
        sample,
        args.out,
        hooks=args.hooks,
        positions=args.positions,
        dtype=settings["dtype"],
        batch_size=args.batch_size,
        padding_side=args.padding_side,
        workers=args.workers,
        repair=args.repair,
        progress=not args.no_progress,
        settings=settings,
    )
    if store is None:
        return 0
    items = len(store.item_ids)
    where = f"datasets.load_from_disk({str(args.out)!r})"
    print(f"stored {len(store):,} rows of {items} items in {args.out} (read it with {where})")
    for path, reason in sample.skipped:
        print(f"  skipped {path}: {reason}")
    for hook, bad in store.nonfinite.items():
        named = ", ".join(list(bad)[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        print(
            f"  NaN/inf: {hook} holds NaN or inf in {sum(bad.values()):,} rows of {len(bad)} items "
            f"({named}); stored as the model gave them (ActivationStore.nonfinite lists them)"
        )
    if warning:
        print(f"  NOTE: {warning}")
    return 0
