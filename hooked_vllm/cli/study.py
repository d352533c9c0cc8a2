"""``hooked-vllm study NAME``: a published experiment (:mod:`hooked_vllm.studies`) over a dataset, with
its report.

A run writes ``items/`` (per-item results, resumable), ``aggregates.json``, ``report.html`` and the
figures as PNG into ``--out`` (default ``study-NAME-out``). Run the same command again after an
interruption to resume. Each of the study's parameters is a flag (the paper's setting by default).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from hooked_vllm.cli.common import (
    DEMO,
    DTYPES,
    OneLineParser,
    UsageError,
    add_item_flags,
    add_run_flags,
    check_data_dir,
    int_at_least,
    join_ranks,
    load_data,
    load_model,
    positive_int,
    resolve_device,
    resolve_model,
)
from hooked_vllm.studies.params import STUDIES, param_fields


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_study_flags(parser: argparse.ArgumentParser, params_type: type) -> None:
    """One flag per parameter of a study (its meaning and default from the parameter's metadata)."""
    group = parser.add_argument_group("the study's parameters (defaults: the paper's setting)")
    for spec in param_fields(params_type):
        meta = spec.metadata
        default = spec.default
        help_text = meta["help"] + ("" if default is None else f" (default: {_shown(default)})")
        if meta.get("type") is bool:
            group.add_argument(
                _flag(spec.name), action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        kwargs: dict[str, Any] = {"default": default, "help": help_text}
        if meta.get("type") is int:
            kwargs["type"] = int_at_least(meta.get("minimum", 1))
        elif meta.get("type") is float:
            kwargs["type"] = float
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "nargs" in meta:
            kwargs["nargs"] = meta["nargs"]
        group.add_argument(_flag(spec.name), **kwargs)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``study`` subcommand (one sub-subcommand per study) to ``hooked-vllm``'s subparsers."""
    study = subparsers.add_parser(
        "study",
        help="a published experiment as one command: " + ", ".join(STUDIES),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = study.add_subparsers(dest="study", required=True, parser_class=OneLineParser, metavar="NAME")
    for name, (params_type, _, what) in STUDIES.items():
        run = names.add_parser(name, help=what, description=what)
        run.add_argument(
            "--model",
            default=DEMO,
            help="hub id or local directory of any supported family (default: the shipped demo model)",
        )
        run.add_argument(
            "--dataset",
            default=None,
            choices=["coco", "winoground", "samples", "shapes"],
            help="default: shapes for the demo model (questions with answers), else samples (photos "
            "shipped with the package; the answer is then the model's own prediction)",
        )
        run.add_argument(
            "--data-dir", type=Path, default=None, help="the coco or winoground folder (those datasets only)"
        )
        run.add_argument(
            "--num-items",
            "--n",
            dest="n",
            type=positive_int,
            default=None,
            help="number of items to sample (default: all; 16 for shapes)",
        )
        run.add_argument(
            "--batch-size", type=positive_int, default=8, help="items per forward pass (default: 8)"
        )
        run.add_argument(
            "--out",
            type=Path,
            default=Path(f"study-{name}-out"),
            help="the run folder: results, aggregates and report; a rerun resumes it "
            f"(default: study-{name}-out)",
        )
        run.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
        run.add_argument(
            "--dtype", default="float32", choices=DTYPES, help="model weights' dtype (default: float32)"
        )
        run.add_argument(
            "--device-map", default=None, help="split one model over GPUs, e.g. 'auto' (default: none)"
        )
        run.add_argument("--seed", type=int, default=0, help="seed of the item sample (default: 0)")
        add_item_flags(run)
        run.add_argument(
            "--repair",
            action="store_true",
            help="set corrupt or doubled result parts aside (items/quarantine/) and recompute their items",
        )
        run.add_argument(
            "--allow-weight-mismatch",
            action="store_true",
            help="load a checkpoint whose tensors do not match its config (warns instead of refusing)",
        )
        add_study_flags(run, params_type)
        add_run_flags(run)
    return study


def params_of(args: argparse.Namespace) -> Any:
    """The study's parameters from the flags; a value the study refuses is a :class:`UsageError`."""
    params_type = STUDIES[args.study][0]
    values = {}
    for spec in param_fields(params_type):
        value = getattr(args, spec.name)
        values[spec.name] = tuple(value) if isinstance(value, list) else value
    try:
        return params_type(**values)
    except ValueError as exc:
        raise UsageError(f"study {args.study}: {exc}") from None


def settings_of(args: argparse.Namespace, params: Any) -> dict[str, Any]:
    """The run's settings as values: the inputs (model, data, device) and the study's parameters."""
    dataset = args.dataset or ("shapes" if args.model == DEMO else "samples")
    check_data_dir(args.data_dir, dataset)
    values = {key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(params).items()}
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
        "skip_bad": args.skip_bad,
        "max_pixels": args.max_pixels,
        "study": args.study,
        **values,
    }


def run(args: argparse.Namespace) -> int:
    """Run ``hooked-vllm study NAME``; errors are raised as HookedVLMError (one line in main)."""
    params = params_of(args)
    settings = settings_of(args, params)  # the model source checked too: nothing heavy imported before

    from hooked_vllm.runs.store import STUDY_KIND, ResultStore
    from hooked_vllm.studies import get_study, run_study
    from hooked_vllm.studies.base import open_study_store

    study = get_study(args.study)(params)
    rank, world = join_ranks(settings["device"], args.rendezvous_timeout)
    ResultStore(args.out, rank, settings, repair=args.repair, kind=STUDY_KIND, vector_keys=()).precheck()
    vlm, warning = load_model(args, settings)
    with open_study_store(args.out, rank, world, settings, repair=args.repair) as store:
        sample = load_data(args, settings)
        if not sample.items:
            raise UsageError("The dataset sample is empty (after skipping bad images). Check --data-dir.")
        sample.skip_bad, sample.max_pixels = args.skip_bad, args.max_pixels
        result = run_study(
            study, vlm, sample, store, batch_size=args.batch_size, progress=not args.no_progress
        )
        if result is None:
            return 0
        title = f"{args.study} study: {args.model} on {sample.name} ({result.aggregates['n_items']} items)"
        report = study.write_report(args.out, result.aggregates, title)
    if result.n_resumed:
        print(f"  resumed: {result.n_resumed} of {len(sample.items)} items were already done in {args.out}")
    for line in getattr(study, "summary_lines", summary_lines)(result.aggregates):
        print(f"  {line}")
    for path, reason in sample.skipped:
        print(f"  skipped {path}: {reason}")
    if warning:
        print(f"  NOTE: {warning}")
    print(f"wrote {report}, {args.out / 'aggregates.json'}")
    return 0


def summary_lines(aggregates: dict) -> list[str]:
    """A few lines saying what the study found (each edge type's largest drop, for the knockout)."""
    lines = [f"{aggregates['n_items']} of {aggregates['n_items_run']} items counted"]
    for edge, curve in aggregates.get("edges", {}).items():
        drop = curve["largest_drop"]
        lines.append(
            f"{edge:16s} largest drop {drop['mean']:+.1f}% with blocks "
            f"{drop['window_start']}-{drop['window_start'] + aggregates['window'] - 1} knocked out"
        )
    for kind, result in aggregates.get("kinds", {}).items():  # attribution: agreement per hook kind
        cells = result["cells"]
        shown = {key: "n/a" if cells[key] is None else f"{cells[key]:.3f}" for key in ("pearson", "spearman")}
        lines.append(
            f"hook_{kind:9s} estimate vs real patching over {cells['n']} cells: Pearson "
            f"{shown['pearson']}, Spearman {shown['spearman']}"
        )
    return lines
