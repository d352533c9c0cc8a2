"""What every subcommand shares: the flags' value types, the device and model checks made before
anything is written, and loading the model and the data."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from hooked_vllm.errors import HookedVLMError
from hooked_vllm.model.loading import DEMO, DEMO_PHASES, SHIPPED, resolve_source
from hooked_vllm.runs.constants import READS_DATA_DIR

#: the model dtypes the commands offer (torch's names); torch itself is imported when a command runs
DTYPES = ("bfloat16", "float16", "float32")
#: seconds a rank of a data-parallel run waits for the others to join (``--rendezvous-timeout``)
RENDEZVOUS_TIMEOUT_S = 300.0
#: items of the shapes dataset when --n is not given: for demo-phases enough that the phases' curves
#: have narrow bands (see hooked_vllm/demo/phases/MODEL_CARD.md, "Items"), else a quick look
SHAPES_ITEMS = {DEMO_PHASES: 512}
SHAPES_ITEMS_OTHERWISE = 16


class UsageError(HookedVLMError):
    """A command-line flag has a value the command cannot use."""


class OneLineParser(argparse.ArgumentParser):
    """Bad flags are one line on stderr and exit code 2 (argparse prints the usage too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int):
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


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def resolve_device(requested: str | None) -> str:
    """The device as a value (``cuda`` -> ``cuda:0``), or a :class:`UsageError` if unusable here."""
    import torch

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


def resolve_model(model: str) -> str:
    """``--model`` as a value (a folder resolved), checked before anything is written: a folder must
    hold a checkpoint, and a hub id must be in the local cache or the hub reachable."""
    if model in SHIPPED:
        return model
    source = resolve_source(model)  # raises ModelNotFoundError, one line
    return str(source.path) if source.path is not None else source.name


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


def torch_dtype(name: str) -> Any:
    """``torch.float16`` for ``"float16"`` (one of :data:`DTYPES`)."""
    import torch

    return getattr(torch, name)


def load_model(args, settings):
    import transformers

    from hooked_vllm.model import HookedVLM

    if getattr(args, "no_progress", False):
        transformers.utils.logging.disable_progress_bar()  # HF's "Loading weights" bar too

    strict = not args.allow_weight_mismatch
    if settings["model"] == DEMO:
        from hooked_vllm.demo import MODEL_DIR

        if (MODEL_DIR / "model.safetensors").is_file():
            vlm = HookedVLM.from_pretrained(
                str(MODEL_DIR), dtype=torch_dtype(args.dtype), device=settings["device"], strict=strict
            )
            return vlm, None
        from hooked_vllm.tiny_models import tiny_llava

        warning = "UNTRAINED DEMO MODEL: random weights, so these curves are noise, not findings."
        return HookedVLM.from_hf(*tiny_llava(seed=args.seed)), warning
    try:
        vlm = HookedVLM.from_pretrained(
            settings["model"],
            dtype=torch_dtype(args.dtype),
            device=settings["device"],
            device_map=args.device_map,
            strict=strict,
        )
    except OSError as exc:  # HF: no such hub id or folder, no weights, no network
        raise UsageError(f"Could not load --model {args.model}: {' '.join(str(exc).split())}") from exc
    return vlm, None


def load_data(args, settings):
    from hooked_vllm.runs.datasets import load_dataset

    if settings["dataset"] == "shapes":
        from hooked_vllm.runs.shapes_dataset import load_shapes

        n = args.n or SHAPES_ITEMS.get(settings["model"], SHAPES_ITEMS_OTHERWISE)
        return load_shapes(args.out / "shapes-images", n=n, seed=args.seed)
    return load_dataset(
        settings["dataset"],
        args.data_dir,
        n=args.n,
        seed=args.seed,
        skip_bad=args.skip_bad,
        max_pixels=args.max_pixels,
    )


def add_item_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the subcommands that read dataset items: ``--skip-bad`` and ``--max-pixels``."""
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad items (missing/corrupt images, text holding an image placeholder, images or text "
        "the processor refuses) and list them",
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=None,
        help="refuse images with more pixels than this (default: Pillow's limit, about 89 million)",
    )


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The last flags of every subcommand: progress, the data-parallel rendezvous, tracebacks."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    parser.add_argument(
        "--rendezvous-timeout",
        type=float,
        default=RENDEZVOUS_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun, how long a rank waits for the others to join before it gives up with "
        f"an error (default: {RENDEZVOUS_TIMEOUT_S:g})",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def join_ranks(device: str | None, timeout_s: float = RENDEZVOUS_TIMEOUT_S) -> tuple[int, int]:
    """This process's rank and the world size (``RANK``, ``WORLD_SIZE``, as torchrun sets them); in a
    data-parallel run the process group is joined here, waiting at most ``timeout_s`` for the other
    ranks. A ``WORLD_SIZE`` left in the environment without torchrun's rendezvous address, or ranks
    that never come, are one :class:`UsageError` naming what was waited for."""
    import datetime

    import torch

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or torch.distributed.is_initialized():
        return rank, world
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UsageError(
            f"WORLD_SIZE={world} is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "not, so the other ranks cannot be found. Start a data-parallel run with torchrun "
            f"(torchrun --nproc-per-node {world} -m hooked_vllm.cli ...), or unset WORLD_SIZE for one "
            "process."
        )
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    try:
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:  # torch.distributed.DistStoreError: the others never joined
        reason = " ".join(str(exc).split())[:200]
        raise UsageError(
            f"rank {rank} of {world}: the other ranks did not join at {where} within {timeout_s:g} s "
            f"({reason}). Start every rank (torchrun does), check MASTER_ADDR and MASTER_PORT, raise "
            "--rendezvous-timeout, or unset WORLD_SIZE for one process."
        ) from exc
    return rank, world
