"""The ``hooked-vllm`` command.

    hooked-vllm phase-diagram                       # demo model + embedded data, offline, ~10 s on CPU
    hooked-vllm phase-diagram --model llava-hf/llava-1.5-7b-hf --dataset coco \\
        --data-dir /data/coco --num-items 500 --batch-size 8 --device cuda --dtype float16 \\
        --out runs/llava-coco
    torchrun --nproc-per-node 4 -m hooked_vllm.cli phase-diagram ...   # data parallel
    hooked-vllm cache-activations --hooks blocks.3.hook_resid_post --positions image --out store/
    hooked-vllm study knockout                      # a published experiment (issue 29) on the demo

A run writes ``items/`` (per-item results, resumable), ``aggregates.json``/``.csv``, ``report.html``
and PNGs into ``--out``. Run the same command again after an interruption to resume. Every error is
one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import errno
import signal
import sys
import threading

from hooked_vllm.cli import cache_activations, phase_diagram, study
from hooked_vllm.cli.common import OneLineParser
from hooked_vllm.errors import HookedVLMError

#: each subcommand's module: ``add_parser(subparsers)`` and ``run(args)``
SUBCOMMANDS = {"phase-diagram": phase_diagram, "cache-activations": cache_activations, "study": study}


def build_parser() -> OneLineParser:
    """The ``hooked-vllm`` parser with every subcommand's flags."""
    import argparse

    parser = OneLineParser(
        prog="hooked-vllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for module in SUBCOMMANDS.values():
        module.add_parser(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised wherever the run is (as ``KeyboardInterrupt`` is for SIGINT), so that it stops
    the same way: finished batches kept, the folder's lock released, one line said."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


#: errors of writing that freeing space or another --out mends
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def _os_error_line(exc: OSError, out: object) -> str:
    """An OSError as one line: what failed, on which file, and what to do."""
    what = exc.strerror or " ".join(str(exc).split())
    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno in _WRITE_ERRORS:
        return (
            f"{what}{where}. Finished batches are kept in {out}; free space or make it writable (or "
            "choose another --out), then run the same command again to resume."
        )
    return f"{what}{where}. Check that file, then run the same command again (finished batches are kept)."


def main(argv: list[str] | None = None) -> int:
    """``hooked-vllm SUBCOMMAND ...``: every error is one line on stderr and exit code 2; SIGINT and
    SIGTERM say what was kept (exit codes 130 and 143)."""
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return SUBCOMMANDS[args.command].run(args)
    except HookedVLMError as exc:
        if args.debug:
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk full, a read-only folder... while reading or writing files
        if args.debug:
            raise
        print(f"error: {_os_error_line(exc, args.out)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        what, code = ("interrupted", 130) if isinstance(stop, KeyboardInterrupt) else ("terminated", 143)
        print(f"{what}: finished batches are kept in {args.out}; run again to resume.", file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
