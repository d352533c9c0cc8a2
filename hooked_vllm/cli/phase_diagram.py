"""``hooked-vllm phase-diagram``: the three lenses over a dataset, the phases, and the report.

A run writes ``items/`` (per-item results, resumable), ``aggregates.json``/``.csv``, ``report.html``
and PNGs into ``--out``. Run the same command again after an interruption to resume.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

from hooked_vllm.cli.common import (
    DEMO_PHASES,
    DTYPES,
    SHAPES_ITEMS,
    SHIPPED,
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


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``phase-diagram`` subcommand to ``hooked-vllm``'s subparsers."""
    run = subparsers.add_parser(
        "phase-diagram", help="contextualization, norm-based attention and logit lens -> phases"
    )
    run.add_argument(
        "--model",
        default=DEMO_PHASES,
        help="hub id or local directory of any supported family (LLaVA-1.5/NeXT/OneVision, InstructBLIP, "
        "Qwen2/2.5/3-VL, Gemma 3, Idefics3, SmolVLM, InternVL, PaliGemma), or a shipped demo model: "
        "demo-phases (16 layers, trained in three stages; the default) or demo (6 layers)",
    )
    run.add_argument(
        "--dataset",
        default=None,
        choices=["coco", "winoground", "samples", "shapes"],
        help="default: shapes for the demo models, else samples (photos shipped with the package)",
    )
    run.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the coco or winoground folder (required for those datasets; not read by the others)",
    )
    run.add_argument(
        "--num-items",
        "--n",
        dest="n",
        type=positive_int,
        default=None,
        help=f"number of images/examples to sample (default: all; for shapes {SHAPES_ITEMS[DEMO_PHASES]} "
        "with demo-phases, else 16). Under torchrun use "
        "--num-items: torchrun takes --n as an abbreviation of its own flags",
    )
    run.add_argument("--batch-size", type=positive_int, default=8, help="items per forward pass (default: 8)")
    run.add_argument(
        "--out",
        type=Path,
        default=Path("phase-diagram-out"),
        help="the run folder: results, aggregates and report; a rerun resumes it "
        "(default: phase-diagram-out)",
    )
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    run.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="model weights' dtype (default: float32)"
    )
    run.add_argument(
        "--device-map",
        default=None,
        help="split one model over GPUs, e.g. 'auto' (default: none, the whole model on --device)",
    )
    run.add_argument(
        "--seed", type=int, default=0, help="seed of the item sample and of the run (default: 0)"
    )
    run.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="DataLoader workers (image decoding and the processor; default: 0, in the main process)",
    )
    run.add_argument(
        "--no-verbalize-images",
        action="store_true",
        help="skip the logit lens of every image position at every layer for every item (kept in "
        "items/; the report's explorer computes it for its own items regardless): at 7B it adds "
        "about 5 TFLOP per item, more than half a forward pass's 8.6 (counted, not timed)",
    )
    run.add_argument(
        "--report-items",
        type=non_negative_int,
        default=8,
        help="items shown one by one in report.html (the image, saliency over it for every layer and "
        "head, the logit lens on its grid), spread over the item ids; 0: none. Each costs one "
        "more forward pass and adds layers x (heads + 1) x image tokens x 5.3 bytes to the report "
        "(3.6 MB at LLaVA-1.5-7B; default: 8)",
    )
    add_item_flags(run)
    run.add_argument(
        "--repair",
        action="store_true",
        help="set corrupt or doubled result parts aside (items/quarantine/) and recompute their items",
    )
    run.add_argument(
        "--allow-weight-mismatch",
        action="store_true",
        help="load a checkpoint whose tensors are missing, unexpected or mis-shaped (warns instead of "
        "refusing; missing tensors stay at random initialisation)",
    )
    add_run_flags(run)
    return run


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as values (paths resolved, defaults filled in): what run.json holds."""
    dataset = args.dataset or ("shapes" if args.model in SHIPPED else "samples")
    check_data_dir(args.data_dir, dataset)
    return {
        "model": resolve_model(args.model),
        "dataset": dataset,
        "data_dir": str(args.data_dir.resolve()) if args.data_dir is not None else None,
        "n": args.n,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "device": None if args.device_map else resolve_device(args.device),
        "device_map": args.device_map,
        "dtype": args.dtype,
        "no_verbalize_images": args.no_verbalize_images,
        "skip_bad": args.skip_bad,
        "max_pixels": args.max_pixels,
    }


#: settings added after runs were made with earlier versions: their value in those runs
ADDED_SETTINGS = {"no_verbalize_images": False, "max_pixels": None}


def upgrade_legacy_settings(previous: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The values a run.json of an earlier version meant: earlier versions wrote every value as a
    string (``"None"`` for a default) and lack the settings added since."""
    upgraded: dict[str, Any] = {**ADDED_SETTINGS, **previous}
    if all(isinstance(v, str) for v in previous.values()):
        for key, text in previous.items():
            current = settings.get(key)
            if text == "None":
                upgraded[key] = current if key in ("dataset", "device") else None  # the default, resolved
            elif text in ("True", "False"):
                upgraded[key] = text == "True"
            elif isinstance(current, int) and text.lstrip("-").isdigit():
                upgraded[key] = int(text)
            elif key in ("model", "data_dir") and Path(text).is_dir():
                upgraded[key] = str(Path(text).resolve())
    return upgraded


def _explore(vlm, sample, rows, args) -> list:
    """The report's explored items: ``--report-items`` of the items with an image, spread over ids."""
    from hooked_vllm.report.explorer import explore_items, spread

    by_id = {item.item_id: item for item in sample.items}
    with_image = [row["item_id"] for row in rows if row.get("saliency_last") and row["item_id"] in by_id]
    chosen = [by_id[item_id] for item_id in spread(with_image, args.report_items)]
    return explore_items(vlm, chosen, batch_size=args.batch_size, max_pixels=args.max_pixels)


def run(args: argparse.Namespace) -> int:
    """Run ``hooked-vllm phase-diagram``; errors are raised as HookedVLMError (one line in main)."""
    settings = settings_of(args)  # the model source checked too: nothing heavy imported before

    from hooked_vllm.report.html import write_report
    from hooked_vllm.runs.phase_diagram import nonfinite_summary, open_run_store, run_phase_diagram
    from hooked_vllm.runs.store import ResultStore

    rank, world = join_ranks(settings["device"], args.rendezvous_timeout)
    upgrade = functools.partial(upgrade_legacy_settings, settings=settings)
    # refuse a folder we could not write, or that holds another run, before the model loads; nothing is
    # written into --out before the model has loaded
    ResultStore(args.out, rank, settings, repair=args.repair, upgrade=upgrade).precheck()
    vlm, warning = load_model(args, settings)
    with open_run_store(args.out, rank, world, settings, repair=args.repair, upgrade=upgrade) as store:
        sample = load_data(args, settings)
        if not sample.items:
            raise UsageError("The dataset sample is empty (after skipping bad images). Check --data-dir.")
        result = run_phase_diagram(
            vlm,
            sample,
            store,
            batch_size=args.batch_size,
            workers=args.workers,
            verbalize_images=not args.no_verbalize_images,
            progress=not args.no_progress,
        )
        if result is None:
            return 0
        counted = result.aggregates["n_items"]
        if result.aggregates["n_items_nonfinite"]:
            counted = f"{counted} of {result.aggregates['n_items_run']}"  # the rest: NaN or inf
        title = f"{args.model} on {sample.name} ({counted} items)"
        explored = _explore(vlm, sample, result.rows, args)
        report = write_report(
            args.out,
            result.aggregates,
            result.rows,
            vlm.tokenizer,
            title=title,
            warning=warning,
            explorer=explored,
        )
    if result.n_resumed:
        print(f"  resumed: {result.n_resumed} of {len(sample.items)} items were already done in {args.out}")
    for phase in result.aggregates["phases"]:
        where = f"layers {phase['start']}-{phase['end']}" if phase["found"] else "not found"
        print(f"  {phase['name']:22s} {where:14s} {phase['evidence']}")
    for path, reason in sample.skipped:
        print(f"  skipped {path}: {reason}")
    if nonfinite := nonfinite_summary(result.aggregates):
        print(f"  NaN/inf: {nonfinite}")
    if warning:
        print(f"  NOTE: {warning}")
    print(f"wrote {report}, {args.out / 'aggregates.json'}, {args.out / 'phase_diagram.png'}")
    return 0
