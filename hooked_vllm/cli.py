"""The ``hooked-vllm`` command.

    hooked-vllm phase-diagram                       # demo model + embedded data, offline, ~10 s on CPU
    hooked-vllm phase-diagram --model llava-hf/llava-1.5-7b-hf --dataset coco \\
        --data-dir /data/coco --num-items 500 --batch-size 8 --device cuda --dtype float16 \\
        --out runs/llava-coco
    torchrun --nproc-per-node 4 -m hooked_vllm.cli phase-diagram ...   # data parallel
    hooked-vllm cache-activations --hooks blocks.3.hook_resid_post --positions image --out store/

A run writes ``items/`` (per-item results, resumable), ``aggregates.json``/``.csv``, ``report.html``
and PNGs into ``--out``. Run the same command again after an interruption to resume. Every error is
one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch

from hooked_vllm.activation_cli import add_cli as add_cache_activations
from hooked_vllm.activation_cli import cache_activations
from hooked_vllm.errors import HookedVLMError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEMO = "demo"
#: datasets that read --data-dir
READS_DATA_DIR = ("coco", "winoground")


class UsageError(HookedVLMError):
    """A command-line flag has a value the command cannot use."""


class _OneLineParser(argparse.ArgumentParser):
    """Bad flags are one line on stderr and exit code 2 (argparse prints the usage too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int):
    """An argparse ``type``: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="hooked-vllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    run = sub.add_parser(
        "phase-diagram", help="contextualization, norm-based attention and logit lens -> phases"
    )
    run.add_argument(
        "--model",
        default=DEMO,
        help="hub id or local directory of any supported family (LLaVA-1.5/NeXT/OneVision, InstructBLIP, "
        "Qwen2/2.5/3-VL, Gemma 3, Idefics3, SmolVLM, InternVL, PaliGemma; default: the shipped demo model)",
    )
    run.add_argument(
        "--dataset",
        default=None,
        choices=["coco", "winoground", "samples", "shapes"],
        help="default: shapes for the demo model, else samples (photos shipped with the package)",
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
        type=_positive_int,
        default=None,
        help="number of images/examples to sample (default: all; 16 for shapes). Under torchrun use "
        "--num-items: torchrun takes --n as an abbreviation of its own flags",
    )
    run.add_argument(
        "--batch-size", type=_positive_int, default=8, help="items per forward pass (default: 8)"
    )
    run.add_argument(
        "--out",
        type=Path,
        default=Path("phase-diagram-out"),
        help="the run folder: results, aggregates and report; a rerun resumes it "
        "(default: phase-diagram-out)",
    )
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    run.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="model weights' dtype (default: float32)"
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
        type=_non_negative_int,
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
        type=_non_negative_int,
        default=8,
        help="items shown one by one in report.html (the image, saliency over it for every layer and "
        "head, the logit lens on its grid), spread over the item ids; 0: none. Each costs one "
        "more forward pass and adds layers x (heads + 1) x image tokens x 5.3 bytes to the report "
        "(3.6 MB at LLaVA-1.5-7B; default: 8)",
    )
    run.add_argument("--skip-bad", action="store_true", help="skip missing/corrupt images and list them")
    run.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=None,
        help="refuse images with more pixels than this (default: Pillow's limit, about 89 million)",
    )
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
    run.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    run.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_cache_activations(sub)
    return parser


# ---------------------------------------------------------------- settings (checked before any write)
def _resolve_device(requested: str | None) -> str:
    """The device as a value (``cuda`` -> ``cuda:0``), or a :class:`UsageError` if unusable here."""
    if requested is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"--device {requested!r} is not a device name. Use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {requested}: CUDA is not available here (no GPU, or torch built without "
                "CUDA). Use --device cpu."
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s). "
                f"Use cuda:0 to cuda:{torch.cuda.device_count() - 1}."
            )
        return f"cuda:{index}"
    return str(device)


def _resolve_model(model: str) -> str:
    if model == DEMO:
        return DEMO
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(
            f"--model {model}: no such model folder. Give a folder holding config.json and the "
            "weights, or a hub id such as llava-hf/llava-1.5-7b-hf."
        )
    return model


def check_data_dir(
    data_dir: Path | None, dataset: str, reads_data_dir: tuple[str, ...] = READS_DATA_DIR
) -> None:
    """``--data-dir`` is given exactly when ``dataset`` reads one, and is a folder."""
    if data_dir is not None and dataset not in reads_data_dir:
        raise UsageError(
            f"--data-dir is given but the {dataset} dataset does not read it. Drop --data-dir, or "
            f"pass --dataset {' or '.join(reads_data_dir)}."
        )
    if data_dir is None and dataset in reads_data_dir:
        raise UsageError(f"--dataset {dataset} needs --data-dir (the folder holding the {dataset} files).")
    if data_dir is not None and not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir} is not a folder. Give the folder of the {dataset} files.")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as values (paths resolved, defaults filled in): what run.json holds."""
    dataset = args.dataset or ("shapes" if args.model == DEMO else "samples")
    check_data_dir(args.data_dir, dataset)
    return {
        "model": _resolve_model(args.model),
        "dataset": dataset,
        "data_dir": str(args.data_dir.resolve()) if args.data_dir is not None else None,
        "n": args.n,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "device": None if args.device_map else _resolve_device(args.device),
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


# ---------------------------------------------------------------- the run
def _load_model(args, settings):
    from hooked_vllm import HookedVLM

    strict = not args.allow_weight_mismatch
    if settings["model"] == DEMO:
        from hooked_vllm.demo import MODEL_DIR

        if (MODEL_DIR / "model.safetensors").is_file():
            vlm = HookedVLM.from_pretrained(
                str(MODEL_DIR), dtype=DTYPES[args.dtype], device=settings["device"], strict=strict
            )
            return vlm, None
        from hooked_vllm.tiny_models import tiny_llava

        warning = "UNTRAINED DEMO MODEL: random weights, so these curves are noise, not findings."
        return HookedVLM.from_hf(*tiny_llava(seed=args.seed)), warning
    try:
        vlm = HookedVLM.from_pretrained(
            settings["model"],
            dtype=DTYPES[args.dtype],
            device=settings["device"],
            device_map=args.device_map,
            strict=strict,
        )
    except OSError as exc:  # HF: no such hub id or folder, no weights, no network
        raise UsageError(f"Could not load --model {args.model}: {' '.join(str(exc).split())}") from exc
    return vlm, None


def _load_data(args, settings):
    from hooked_vllm.data.datasets import load_dataset

    if settings["dataset"] == "shapes":
        from hooked_vllm.data.shapes_dataset import load_shapes

        return load_shapes(args.out / "shapes-images", n=args.n or 16, seed=args.seed)
    return load_dataset(
        settings["dataset"],
        args.data_dir,
        n=args.n,
        seed=args.seed,
        skip_bad=args.skip_bad,
        max_pixels=args.max_pixels,
    )


def _explore(vlm, sample, rows, args) -> list:
    """The report's explored items: ``--report-items`` of the items with an image, spread over ids."""
    from hooked_vllm.report.explorer import explore_items, spread

    by_id = {item.item_id: item for item in sample.items}
    with_image = [row["item_id"] for row in rows if row.get("saliency_last") and row["item_id"] in by_id]
    chosen = [by_id[item_id] for item_id in spread(with_image, args.report_items)]
    return explore_items(vlm, chosen, batch_size=args.batch_size, max_pixels=args.max_pixels)


def phase_diagram(args) -> int:
    from hooked_vllm.experiment import open_run_store, run_phase_diagram
    from hooked_vllm.report.html import write_report

    settings = settings_of(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if settings["device"] != "cpu" else "gloo")
    upgrade = functools.partial(upgrade_legacy_settings, settings=settings)
    with open_run_store(args.out, rank, world, settings, repair=args.repair, upgrade=upgrade) as store:
        sample = _load_data(args, settings)
        if not sample.items:
            raise UsageError("The dataset sample is empty (after skipping bad images). Check --data-dir.")
        vlm, warning = _load_model(args, settings)
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
        title = f"{args.model} on {sample.name} ({result.n_items} items)"
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
    if warning:
        print(f"  NOTE: {warning}")
    print(f"wrote {report}, {args.out / 'aggregates.json'}, {args.out / 'phase_diagram.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "phase-diagram":
            return phase_diagram(args)
        if args.command == "cache-activations":
            return cache_activations(args)
    except HookedVLMError as exc:
        if args.debug:
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished batches are kept in {args.out}; run again to resume.", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
