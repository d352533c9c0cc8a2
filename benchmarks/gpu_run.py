"""One prepared GPU run: every GPU number the project still lacks, in one call of the GPU machine.

    python benchmarks/gpu_run.py --prepare-wheels            # here, before: .whl/ (what the image lacks)
    python3 benchmarks/gpu_run.py --out $OUT --wheels .whl   # there: the device tool's `run` (BENCHMARKS.md)
    python benchmarks/gpu_run.py --dry-run --out /tmp/dry    # a CPU rehearsal (tests/test_gpu_run.py)

A GPU machine is lent now and then, for about 15 minutes in all (its start included; one command
at most 10 minutes), so everything happens in one command of about 7 minutes (``--budget``). Steps,
most valuable first, each in its own process with its own time limit; a failed or timed-out step
does not stop the run, and a step is not started when less than its minimum is left:

  env           the image's versions (torch, transformers, triton, ...) and the CUDA device
  install       the carried wheels (transformer-lens and the requirements the image lacks; a wheel
                of something the image has is installed only if pyproject.toml's range rejects the
                image's version) into a --target folder put on every later step's PYTHONPATH
  tests         pytest tests/test_attention_lenses.py: the compiled kernel against the PyTorch path
                (fp32/fp16/bf16, <= 1e-3) and the fused collector on CUDA against the CPU
  sweep         block sizes / warps of the group-sums kernel at 7B shapes (batches 1 and 8, fp16),
                each checked against PyTorch; the fastest is written where the kernel reads it
                (hooked_vllm/kernels/tuned.json), so the steps after it run with it
  llava         benchmarks/gpu.py --size 7b, LLaVA-1.5, fp16, batches 1 and 8, then the dataset path
                (128 synthetic images) against the sdpa forward alone
  precision     the lenses in fp16 and bf16 against an fp32 run of a reduced-depth 7B-width LLaVA
  instructblip  benchmarks/gpu.py --size 7b, InstructBLIP-Vicuna, fp16, batch 8
  llava-b32     benchmarks/gpu.py --size 7b, LLaVA-1.5, fp16, batch 32 (when time is left)

Everything lands in --out: run.log (every step's output, appended while it runs), summary.json
(per step: command, status, rc, seconds and the numbers parsed from its output; rewritten after
every step, so a killed run leaves what it had) and tuned.json (the sweep's choice, to commit as
hooked_vllm/kernels/tuned.json). The device returns at most 8 files from $OUT, hence one log.

``--dry-run`` runs the same steps on the CPU with mid-size models, tiny kernel shapes in Triton's
interpreter, a probe wheel instead of the carried ones and the tuned file in a scratch folder.
``--steps a,b`` runs some steps only, and the install (a rerun of what failed).
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import datetime
import functools
import hashlib
import importlib
import importlib.metadata as metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
RESULT = "RESULT "  # an internal step's last word: this prefix and one line of JSON
# transformer-lens 4.3 and the requirements the GPU image lacks (shared/TL4-NOTES.md, "The GPU
# machine"), plus transformers in case the image's is outside pyproject.toml's range; downloaded at
# the versions this environment has (pure-Python wheels; multiprocess's is per Python version).
CARRIED = (
    "transformer-lens",
    "datasets",
    "dill",
    "multiprocess",
    "beartype",
    "typeguard",
    "fancy-einsum",
    "transformers",
)
IMAGE_PYTHON = "3.12"
CARRY_LIMIT_MIB = 64  # the device tool's limit for the working tree and the carried paths together
DEFAULT_BUDGET_S = 420

# The sweep: today's default (DEFAULT_LAUNCH) first, then a handful around it: four warps, smaller
# and larger blocks (the [query_block, key_block, rank] float32 accumulator of a program grows with
# both), more programs per multiprocessor. Each is checked against PyTorch before it is timed.
SWEEP_CONFIGS = (
    dict(query_block=16, key_block=32, num_warps=8, programs_per_sm=4),
    dict(query_block=16, key_block=32, num_warps=4, programs_per_sm=4),
    dict(query_block=32, key_block=32, num_warps=8, programs_per_sm=4),
    dict(query_block=16, key_block=64, num_warps=8, programs_per_sm=4),
    dict(query_block=32, key_block=16, num_warps=4, programs_per_sm=4),
    dict(query_block=16, key_block=16, num_warps=4, programs_per_sm=4),
    dict(query_block=16, key_block=32, num_warps=8, programs_per_sm=8),
)
# heads, d_head, d_model, positions (LLaVA-1.5: 5 template, 576 image, instruction, last)
SWEEP_SHAPES = {"7b": (32, 128, 4096, 607), "tiny": (4, 16, 32, 40)}


# ---------------------------------------------------------------- the plan
@dataclasses.dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: float  # killed after this
    min_s: float  # not started with less than this left
    parse: Callable[[str], dict]
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def plan(args, scratch: Path) -> list[Step]:
    """The steps, in order; GPU settings, or the dry run's shrunk ones."""
    dry = args.dry_run
    py = sys.executable
    inner = [py, str(THIS), "--out", str(args.out)] + (["--dry-run"] if dry else [])
    wheels = make_probe_wheel(scratch) if dry else (REPO / args.wheels)

    def gpu_py(family: str, *extra: str) -> list[str]:
        common = ["--size", "mid", "--device", "cpu", "--repeats", "1"] if dry else ["--size", "7b"]
        dtype = ["--dtype", "float32" if dry else "float16"]
        return [py, "benchmarks/gpu.py", "--family", family, *common, *dtype, *extra]

    pytest = [py, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_attention_lenses.py"]
    if dry:
        pytest += ["-k", "group_sums_match_the_definition and shape0"]
    sweep = (
        ["--shape", "tiny", "--batches", "1", "--repeats", "1"]
        if dry
        else ["--shape", "7b", "--batches", "1", "8"]
    )
    llava = (
        ["--batches", "1", "--pipeline", "2", "--pipeline-batch", "2", "--workers", "0"]
        if dry
        else ["--batches", "1", "8", "--pipeline", "128", "--workers", "4"]
    )
    precision = (
        ["--size", "mid", "--layers", "2", "--batch", "2"] if dry else ["--size", "7b", "--layers", "8"]
    )
    instructblip = "1" if dry else "8"
    llava_b32 = ["1"] if dry else ["32", "--repeats", "2"]
    interpret = {"TRITON_INTERPRET": "1"} if dry else {}

    def limit(gpu_s: float) -> float:  # the dry run's steps are small but start slowly on 2 cores
        return 120.0 if dry else float(gpu_s)

    sweep += ["--deadline-s", str(limit(100) - 30)]  # no new configuration after: time to write it
    return [
        Step("env", [*inner, "--step", "env"], limit(60), 5, parse_result),
        Step("install", [*inner, "--step", "install", "--wheels", str(wheels)], limit(90), 10, parse_result),
        Step("tests", pytest, limit(150), 30, parse_pytest),
        Step("sweep", [*inner, "--step", "sweep", *sweep], limit(100), 30, parse_result, interpret),
        Step("llava", gpu_py("llava", *llava), limit(200), 60, parse_gpu),
        Step("precision", [*inner, "--step", "precision", *precision], limit(90), 30, parse_result),
        Step("instructblip", gpu_py("instructblip", "--batches", instructblip), limit(150), 60, parse_gpu),
        Step("llava-b32", gpu_py("llava", "--batches", *llava_b32), limit(150), 90, parse_gpu),
    ]  # fmt: skip


# ---------------------------------------------------------------- running the plan
def orchestrate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-run-"))
    site = scratch / "site"
    site.mkdir()
    steps = plan(args, scratch)
    if args.steps:
        wanted = args.steps.split(",")
        unknown = sorted(set(wanted) - {step.name for step in steps})
        if unknown:
            raise SystemExit(f"--steps: unknown {unknown}; the steps are {[s.name for s in steps]}")
        steps = [step for step in steps if step.name in wanted or step.name == "install"]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH")) if p),
        "GPU_RUN_SITE": str(site),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if args.dry_run:  # a CPU rehearsal, also on a GPU machine; the repo's tuned.json is left alone
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["HOOKED_VLLM_KERNEL_TUNING"] = str(scratch / "tuned.json")
    summary = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "budget_s": args.budget,
        "python": sys.version.split()[0],
        "image": {name: _version(name) for name in ("torch", "transformers", "triton", *CARRIED)},
        "steps": [],
    }
    print(f"gpu_run: {len(steps)} steps, budget {args.budget:.0f} s, out {out}")
    print("gpu_run: image versions before the install: " + json.dumps(summary["image"]), flush=True)
    start = time.monotonic()
    log_path = out / "run.log"
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _stop)
    with open(log_path, "ab") as log:
        for step in steps:
            left = args.budget - (time.monotonic() - start)
            record = {"name": step.name, "command": " ".join(step.argv), "limit_s": step.limit_s}
            if left < step.min_s:
                record.update(
                    status="skipped", reason=f"{left:.0f} s left of the budget, needs {step.min_s:.0f}"
                )
            else:
                limit, step_start = min(step.limit_s, left), time.monotonic()
                try:
                    record.update(run_step(step, log, log_path, {**env, **step.env}, limit))
                except SystemExit:  # the run itself was stopped (_stop): say where, keep the rest
                    record.update(status="interrupted", seconds=round(time.monotonic() - step_start, 1))
                    summary["steps"].append(record)
                    write_json(out / "summary.json", summary)
                    shutil.rmtree(scratch, ignore_errors=True)
                    raise
            summary["steps"].append(record)
            summary["elapsed_s"] = round(time.monotonic() - start, 1)
            write_json(out / "summary.json", summary)
            numbers = json.dumps(record.get("numbers", record.get("reason", "")))
            print(
                f"gpu_run: {step.name:12s} {record['status']:8s} {record.get('seconds', 0):6.1f} s  "
                f"{numbers[:150]}{'...' if len(numbers) > 150 else ''}",
                flush=True,
            )
            if record["status"] in ("failed", "timeout"):
                print("  | " + "\n  | ".join(record.get("tail", [])), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    failed = [s["name"] for s in summary["steps"] if s["status"] != "ok"]
    print(f"gpu_run: done in {summary.get('elapsed_s', 0):.0f} s; not ok: {failed or 'none'}")
    compact = [{k: v for k, v in s.items() if k not in ("command", "tail")} for s in summary["steps"]]
    print("gpu_run: steps " + json.dumps(compact, separators=(",", ":")))
    return 1 if failed else 0


def run_step(step: Step, log, log_path: Path, env: dict[str, str], limit: float) -> dict:
    """Runs one step in its own process group, its output appended to the log; kills the whole
    group (DataLoader workers too) at the time limit."""
    log.write(f"\n===== {step.name} (limit {limit:.0f} s): {' '.join(step.argv)}\n".encode())
    log.flush()
    offset = log.tell()
    start = time.monotonic()
    try:
        process = subprocess.Popen(
            step.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, **_OWN_GROUP,
        )  # fmt: skip
    except OSError as error:
        return dict(status="error", rc=None, seconds=0.0, numbers={}, tail=[str(error)])
    _running.append(process.pid)
    try:
        rc = process.wait(timeout=limit)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        status, rc = "timeout", None
    _kill_group(process.pid)
    _running.remove(process.pid)
    if rc is None:
        process.wait()
    seconds = round(time.monotonic() - start, 1)
    log.write(f"===== {step.name}: {status}, rc {rc}, {seconds} s\n".encode())
    log.flush()
    with open(log_path, "rb") as read:
        read.seek(offset)
        text = read.read().decode(errors="replace")
    try:
        numbers = step.parse(text)
    except Exception as error:  # noqa: BLE001 - a parser's slip must not cost the run
        numbers = {"parse_error": f"{type(error).__name__}: {error}"}
    record = dict(status=status, rc=rc, seconds=seconds, numbers=numbers)
    if status != "ok":
        record["tail"] = text.splitlines()[-20:]
    return record


# Each step in a process group of its own (not a new session: the device machine ends a command's
# leftover processes unless they started a session of their own), killed whole at its limit.
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
_running: list[int] = []


def _stop(signum, frame) -> None:
    """SIGTERM/SIGHUP/SIGINT of the whole run: end the running step's group too, then exit."""
    for pid in _running:
        _kill_group(pid)
    raise SystemExit(128 + signum)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def write_json(path: Path, data) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    partial.replace(path)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- parsing the steps' output
def parse_result(text: str) -> dict:
    """The internal steps' ``RESULT {json}`` line."""
    lines = [line for line in text.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT) :]) if lines else {}


def parse_pytest(text: str) -> dict:
    """Counts from pytest's closing line, and the outcome of each test that needs a GPU (-rA)."""
    numbers: dict = {}
    for line in reversed(text.splitlines()):
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", line)
        if counts and " in " in line:
            numbers.update({word: int(n) for n, word in counts})
            break
    outcomes = re.findall(r"^(PASSED|FAILED|ERROR) (\S+::\S+)", text, re.M)
    numbers["gpu_tests"] = {name.split("::")[-1]: word for word, name in outcomes if "gpu" in name}
    no_gpu = re.findall(r"^SKIPPED \[(\d+)\] .*needs a CUDA GPU", text, re.M)
    numbers["skipped_for_want_of_a_gpu"] = sum(map(int, no_gpu))
    return numbers


_ROW = re.compile(r"^  (\S.*?)\s+([\d.]+) ms\s+([\d.]+)x\s+([\d.]+) items/s\s+peak \+\s*([\d.]+) MiB", re.M)
_BATCH = re.compile(r"^batch (\d+), (\d+) positions", re.M)
_PIPELINE = re.compile(
    r"^  (HF sdpa forward alone|run_phase_diagram, [^(]*?)\s*\(.*?\)\s+([\d.]+) items/s", re.M
)


def parse_gpu(text: str) -> dict:
    """benchmarks/gpu.py's tables: per batch size, each row's ms, ratio to HF sdpa, items/s and
    peak MiB; the dataset path's items/s."""
    numbers: dict = {}
    header = re.search(r"^(\w+ \w+): (\d+) layers x (\d+), (\S+), (\S+), torch (\S+)", text, re.M)
    if header:
        numbers["model"] = header.group(0)
    marks = [(m.start(), m) for m in _BATCH.finditer(text)]
    for i, (begin, match) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        rows = {
            row.group(1): {
                "ms": float(row.group(2)),
                "x_sdpa": float(row.group(3)),
                "items_s": float(row.group(4)),
                "peak_mib": float(row.group(5)),
            }
            for row in _ROW.finditer(text, begin, end)
        }
        numbers[f"batch {match.group(1)}"] = {"positions": int(match.group(2)), **rows}
    pipeline = {m.group(1).strip(): float(m.group(2)) for m in _PIPELINE.finditer(text)}
    if pipeline:
        numbers["dataset path, items/s"] = pipeline
    return numbers


# ---------------------------------------------------------------- internal steps
def step_env(args) -> dict:
    """The image as it is, before the install: versions (imported for torch and transformers, read
    from the installed metadata for the rest) and the CUDA device."""
    import torch

    info: dict = {"python": sys.version.split()[0], "torch.__version__": torch.__version__}
    info["cuda"] = torch.version.cuda
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["multiprocessors"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    import transformers

    info["transformers.__version__"] = transformers.__version__
    names = ("triton", "numpy", "tokenizers", "huggingface-hub", "accelerate", "pyarrow", "fsspec", *CARRIED)
    info["versions"] = {name: _version(name) for name in names}
    print("\n".join(f"{key}: {value}" for key, value in info.items()))
    return info


def step_install(args) -> dict:
    """pip-installs the carried wheels the image needs into $GPU_RUN_SITE (on every step's
    PYTHONPATH), then imports what the run needs from there."""
    site = Path(os.environ["GPU_RUN_SITE"])
    wheel_dir = Path(args.wheels)
    wheels, kept = select_wheels(sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else [])
    for name, why in kept.items():
        print(f"not installed: {name} ({why})")
    result: dict = {"wheels": [wheel.name for wheel in wheels], "kept_from_image": kept}
    if wheels:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]  # fmt: skip
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    importlib.invalidate_caches()
    modules = ["transformer_lens", "datasets", "hooked_vllm", "hooked_vllm.analysis"]
    modules += [_top_level(wheel) for wheel in wheels if wheel.name.startswith("gpu_run_probe")]
    result["imported"] = {}
    for module in modules:
        try:
            imported = importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - report every import that fails, then fail
            result.setdefault("import_errors", {})[module] = f"{type(error).__name__}: {error}"
            continue
        where = Path(getattr(imported, "__file__", "") or "?")
        result["imported"][module] = str(where.parent if where.name == "__init__.py" else where)
    result["versions"] = {_name(w): _version(_name(w)) for w in wheels}
    result["versions"]["transformers"] = _version("transformers")
    print(json.dumps(result, indent=1))
    return result


def select_wheels(wheels: list[Path]) -> tuple[list[Path], dict[str, str]]:
    """The wheels to install: all but those of a distribution the image has at a version that
    pyproject.toml's range accepts (the image's transformers, say)."""
    from packaging.version import Version

    ranges = project_ranges()
    chosen, kept = [], {}
    for wheel in wheels:
        name, have = _name(wheel), _version(_name(wheel))
        if have is not None and name in ranges and Version(have) in ranges[name]:
            kept[wheel.name] = f"the image's {name} {have} is in pyproject's range {ranges[name]}"
        else:
            chosen.append(wheel)
    return chosen, kept


def project_ranges() -> dict:
    """pyproject.toml's dependencies: canonical name -> SpecifierSet."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        import tomllib
    except ImportError:  # Python 3.10: no ranges known, every carried wheel is installed
        return {}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {canonicalize_name(r.name): r.specifier for r in requirements}


def _name(wheel: Path) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(wheel.name.split("-")[0])


def _top_level(wheel: Path) -> str:
    return wheel.name.split("-")[0]


def sweep_inputs(shape: str, batch: int, device: str, dtype):
    """q, k, head Gram and the collector's query groups (image, instruction, last position)."""
    import torch

    from hooked_vllm.analysis.norm_attention import head_gram

    heads, d_head, d_model, positions = SWEEP_SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, positions, d_head, generator=gen).to(device, dtype)
    k = torch.randn(batch, heads, positions, d_head, generator=gen).to(device, dtype)
    v = torch.randn(batch, positions, heads, d_head, generator=gen).to(device, dtype)
    w_o = (torch.randn(heads, d_head, d_model, generator=gen) / d_model**0.5).to(device, dtype)
    groups = torch.zeros(batch, 3, positions, device=device)
    groups[:, 0, 5 : positions - 26] = 1
    groups[:, 1, positions - 26 : positions - 5] = 1
    groups[:, 2, positions - 1] = 1
    mask = torch.ones(batch, positions, dtype=torch.bool, device=device)
    return q, k, head_gram(v, w_o), groups, mask


def step_sweep(args) -> dict:
    """Times each launch configuration of the group-sums kernel (round-robin, with the PyTorch path
    and sdpa for scale), checks each against the PyTorch path, writes the fastest correct one
    (summed over the batch sizes) to the kernel's tuned file and to --out."""
    import torch

    from hooked_vllm.kernels import attention_lenses as kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not kernel.can_run(torch.empty(0, device=device)):
        raise SystemExit("The kernel cannot run here: no CUDA device, and not in Triton's interpreter.")
    deadline = time.monotonic() + args.deadline_s
    configs = [dict(kernel.DEFAULT_LAUNCH), dict(kernel.LAUNCH)]
    configs += [dict(c) for c in (SWEEP_CONFIGS[:2] if kernel.interpreting() else SWEEP_CONFIGS)]
    configs = [dict(t) for t in dict.fromkeys(tuple(sorted(c.items())) for c in configs)]
    result: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)"}
    result.update(
        shape=args.shape, dtype="float16", loaded=_label(kernel.LAUNCH), errors={}, failed={}, ms={}
    )
    for batch in args.batches:
        _sweep_batch(args.shape, batch, configs, result, deadline, args.repeats, device)
    timed = [c for c in configs if all(_label(c) in ms for ms in result["ms"].values())]
    if not timed:
        raise SystemExit("No launch configuration ran correctly: nothing written. " + json.dumps(result))
    best = min(timed, key=lambda c: sum(ms[_label(c)] for ms in result["ms"].values()))
    result["chosen"] = _label(best)
    result["agreement"] = _agreement(args.shape, min(args.batches), best, device)
    tuned = {key: best[key] for key in kernel.DEFAULT_LAUNCH}
    tuned["measured"] = {
        "date": datetime.date.today().isoformat(),
        "device": result["device"],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "shape": args.shape,
        "dtype": "float16",
        "ms": result["ms"],
        "note": "written by benchmarks/gpu_run.py's sweep; the kernel reads only the keys above",
    }
    for path in (kernel.tuning_path(), Path(args.out) / "tuned.json"):
        write_json(path, tuned)
    result["written"] = str(kernel.tuning_path())
    return result


def _label(config: dict) -> str:
    return "q{query_block} k{key_block} w{num_warps} s{programs_per_sm}".format(**config)


def _sweep_batch(shape, batch, configs, result, deadline, repeats, device) -> None:
    """Checks every configuration not yet failed at this batch size (none new after the deadline),
    then times those that agree with PyTorch, round-robin; into ``result``."""
    import torch

    sys.path.insert(0, str(THIS.parent))
    from common import interleaved_times

    from hooked_vllm.analysis.attention_lenses import attention_group_sums
    from hooked_vllm.analysis.norm_attention import gram_factor
    from hooked_vllm.kernels import attention_lenses as kernel

    q, k, gram, groups, mask = sweep_inputs(shape, batch, device, torch.float16)
    factor, scaling = gram_factor(gram), q.shape[-1] ** -0.5
    v = torch.randn(batch, q.shape[1], q.shape[2], q.shape[3], device=device, dtype=q.dtype)
    fns = {
        "torch path": lambda: attention_group_sums(
            q, k, gram, groups, mask, scaling=scaling, backend="torch"
        ),
        "sdpa (for scale)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    reference = fns["torch path"]()
    for config in configs:
        name = _label(config)
        if name in result["failed"] or time.monotonic() > deadline:
            continue
        fns[name] = functools.partial(
            kernel.attention_group_sums, q, k, factor, groups, mask, scaling=scaling, launch=config
        )
        try:
            error = max(_relative(a, b) for a, b in zip(fns[name](), reference, strict=True))
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is a result
            error, why = float("nan"), f"{type(exc).__name__}: {str(exc)[:300]}"
        else:
            why = None if error <= 1e-3 else f"differs from PyTorch by {error:.1e}"
        result["errors"].setdefault(name, {})[f"batch {batch}"] = error
        if why:
            result["failed"][name] = why
            del fns[name]
    times = interleaved_times(fns, repeats, device)
    result["ms"][f"batch {batch}"] = {name: round(s * 1000, 3) for name, s in times.items()}
    print(f"batch {batch}: " + json.dumps(result["ms"][f"batch {batch}"]), flush=True)


def _agreement(shape: str, batch: int, config: dict, device: str) -> dict:
    """The chosen configuration against the PyTorch path in each input dtype."""
    import torch

    from hooked_vllm.analysis.attention_lenses import attention_group_sums
    from hooked_vllm.analysis.norm_attention import gram_factor
    from hooked_vllm.kernels import attention_lenses as kernel

    agreement: dict = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        if dtype == torch.bfloat16 and kernel.interpreting():
            agreement[name] = "not checked: the interpreter's tl.dot multiplies bfloat16 bit patterns"
            continue  # (triton-lang/triton#11584; compiled, tests/test_attention_lenses.py checks it)
        q, k, gram, groups, mask = sweep_inputs(shape, batch, device, dtype)
        scaling = q.shape[-1] ** -0.5
        got = kernel.attention_group_sums(
            q, k, gram_factor(gram), groups, mask, scaling=scaling, launch=config
        )
        expected = attention_group_sums(q, k, gram, groups, mask, scaling=scaling, backend="torch")
        agreement[name] = max(_relative(a, b) for a, b in zip(got, expected, strict=True))
    return agreement


def _relative(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def step_precision(args) -> dict:
    """The three lenses in float16 and bfloat16 against float32 of the same random weights: a LLaVA
    of --size's width with --layers layers (the 7B width at reduced depth fits in float32 beside its
    half copy). TF32 off, so the reference is plain float32."""
    import torch

    sys.path.insert(0, str(THIS.parent))
    import gpu
    from common import PROMPT, sample_images

    from hooked_vllm import HookedVLM
    from hooked_vllm.analysis import collect

    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    text, full = gpu.SIZES[args.size]
    gpu.SIZES["reduced"] = (dataclasses.replace(text, n_layers=args.layers), full)
    torch.manual_seed(0)
    model, processor = gpu.build("llava", "reduced", device, torch.float32)
    reference_vlm = HookedVLM.from_hf(copy.deepcopy(model), processor)
    batch = reference_vlm.prepare(sample_images(args.batch), [PROMPT] * args.batch).to(device)
    reference = collect(reference_vlm, batch)
    del reference_vlm
    result: dict = {
        "model": f"llava {args.size} width, {args.layers} layers x {text.d_model}, {device}",
        "batch": args.batch,
        "positions": int(batch.input_ids.shape[1]),
    }
    for dtype in (torch.float16, torch.bfloat16):
        half = HookedVLM.from_hf(copy.deepcopy(model).to(dtype), processor)
        got = collect(half, batch)
        del half
        if device == "cuda":
            torch.cuda.empty_cache()
        context = max(
            _finite_max((got.contextualization.per_item()[group] - values).abs())
            for group, values in reference.contextualization.per_item().items()
        )
        norm = max(
            _finite_max((got.attention.norm[pair] - values).abs() / values.abs().clamp_min(1e-6))
            for pair, values in reference.attention.norm.items()
        )
        top1 = (got.lens.top_tokens[..., 0] == reference.lens.top_tokens[..., 0]).float().mean()
        result[str(dtype).removeprefix("torch.")] = {
            "contextualization_max_abs": context,
            "norm_attention_max_rel": norm,
            "logit_lens_top1_agreement": float(top1),
            "logit_lens_final_prob_max_abs": _finite_max(
                (got.lens.final_prob - reference.lens.final_prob).abs()
            ),
        }
        print(dtype, result[str(dtype).removeprefix("torch.")], flush=True)
    return result


def _finite_max(values) -> float:
    values = values.float()
    finite = values[values.isfinite()]
    return float(finite.max()) if finite.numel() else float("nan")


STEPS = {"env": step_env, "install": step_install, "sweep": step_sweep, "precision": step_precision}


# ---------------------------------------------------------------- the wheels
def prepare_wheels(args) -> int:
    """Downloads the carried wheels for the image's Python (no dependencies: CARRIED names them),
    at the versions installed here, into --wheels, and has git ignore that folder."""
    target = REPO / args.wheels
    if target.exists():
        shutil.rmtree(target)  # one version of each: two stop the install
    target.mkdir(parents=True)
    pins = []
    for name in CARRIED:
        have = _version(name)
        if have is None:
            raise SystemExit(f"{name} is not installed here: install the project (pip install -e .) first.")
        pins.append(f"{name}=={have}")
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", IMAGE_PYTHON, "--implementation", "cp", "-d", str(target)]  # fmt: skip
    command += [arg for platform in platforms for arg in ("--platform", platform)] + pins
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    exclude = subprocess.run(
        ["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    if exclude:
        exclude_path = REPO / exclude
        line = f"/{args.wheels.strip('/')}/"
        lines = exclude_path.read_text().splitlines() if exclude_path.exists() else []
        if line not in lines:
            exclude_path.parent.mkdir(parents=True, exist_ok=True)
            exclude_path.write_text("\n".join([*lines, line]) + "\n")
            print(f"{line} added to {exclude}")
    sizes = {wheel.name: wheel.stat().st_size for wheel in sorted(target.glob("*.whl"))}
    for name, size in sizes.items():
        print(f"  {size / 2**20:6.2f} MiB  {name}")
    total = sum(sizes.values()) / 2**20
    print(f"  {total:6.2f} MiB in all (carry + working tree <= {CARRY_LIMIT_MIB} MiB)")
    return 0


def make_probe_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel, so that the dry run installs something as the GPU run does."""
    folder = directory / "wheels"
    folder.mkdir(exist_ok=True)
    files = {
        "gpu_run_probe/__init__.py": 'VERSION = "0.0.1"\n',
        "gpu_run_probe-0.0.1.dist-info/METADATA": (
            "Metadata-Version: 2.1\nName: gpu-run-probe\nVersion: 0.0.1\n"
        ),
        "gpu_run_probe-0.0.1.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: gpu_run\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }

    def digest(text: str) -> str:
        raw = hashlib.sha256(text.encode()).digest()
        return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    record = "".join(f"{name},{digest(text)},{len(text.encode())}\n" for name, text in files.items())
    files["gpu_run_probe-0.0.1.dist-info/RECORD"] = record + "gpu_run_probe-0.0.1.dist-info/RECORD,,\n"
    path = folder / "gpu_run_probe-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return folder


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal: mid size, interpreter kernel")
    parser.add_argument("--prepare-wheels", action="store_true", help="download the carried wheels here")
    parser.add_argument("--wheels", default=".whl", help="the carried wheels' folder, relative to the repo")
    parser.add_argument("--budget", type=float, default=None, help=f"seconds (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--steps", help="comma-separated step names: run only these")
    inner = parser.add_argument_group("internal steps (run by the orchestrator)")
    inner.add_argument("--step", choices=sorted(STEPS))
    inner.add_argument("--shape", choices=sorted(SWEEP_SHAPES), default="7b")
    inner.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    inner.add_argument("--repeats", type=int, default=20)
    inner.add_argument("--deadline-s", type=float, default=80.0, help="sweep: no new configuration after")
    inner.add_argument("--size", default="7b")
    inner.add_argument("--layers", type=int, default=8)
    inner.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    if args.prepare_wheels:
        return prepare_wheels(args)
    if not args.out:
        parser.error("--out is required (or $OUT set)")
    if args.step:
        result = STEPS[args.step](args)
        print(RESULT + json.dumps(result, default=str), flush=True)
        return 1 if result.get("import_errors") else 0
    if args.budget is None:
        args.budget = 900.0 if args.dry_run else float(DEFAULT_BUDGET_S)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
