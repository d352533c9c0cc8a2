"""benchmarks/gpu_run.py, the one prepared GPU run, rehearsed on the CPU: ``--dry-run`` runs every
step (mid-size models, tiny kernel shapes in Triton's interpreter, a probe wheel) and leaves its
numbers in summary.json, so that no device time is spent on a script that does not work. Also the
pieces the dry run cannot reach: a step killed at its limit, the wheel selection, the parsers, and
the kernel's tuned launch file."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["env", "install", "tests", "sweep", "llava", "precision", "instructblip", "llava-b32"]


def load_gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run", REPO / "benchmarks" / "gpu_run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_run", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_runs_every_step_and_records_its_numbers(tmp_path):
    pytest.importorskip("triton")
    tuned = REPO / "hooked_vllm" / "kernels" / "tuned.json"
    before = tuned.read_bytes() if tuned.exists() else None
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_run.py", "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {step["name"]: step for step in summary["steps"]}
    assert list(steps) == STEPS
    for name, step in steps.items():
        assert step["status"] == "ok" and step["rc"] == 0 and step["numbers"], (name, step)
    numbers = {name: step["numbers"] for name, step in steps.items()}
    assert "gpu_run_probe" in numbers["install"]["imported"]  # installed, and found on PYTHONPATH
    assert "gpu-run-" in numbers["install"]["imported"]["gpu_run_probe"]  # the scratch --target folder
    assert numbers["tests"]["passed"] >= 1 and "failed" not in numbers["tests"]
    sweep = numbers["sweep"]
    assert sweep["chosen"] in sweep["ms"]["batch 1"] and not sweep["failed"]
    assert sweep["agreement"]["float32"] <= 1e-5 and sweep["agreement"]["float16"] <= 1e-3
    written = json.loads((out / "tuned.json").read_text())
    assert {"query_block", "key_block", "num_warps", "programs_per_sm"} <= set(written)
    for name in ("llava", "instructblip", "llava-b32"):
        batch = next(value for key, value in numbers[name].items() if key.startswith("batch "))
        assert batch["HF sdpa"]["ms"] > 0 and batch["collect (3 lenses)"]["x_sdpa"] > 0, name
    assert numbers["llava"]["dataset path, items/s"]["HF sdpa forward alone"] > 0
    for dtype in ("float16", "bfloat16"):
        assert numbers["precision"][dtype]["contextualization_max_abs"] < 1e-2
        assert numbers["precision"][dtype]["norm_attention_max_rel"] < 1e-1
    # What the device hands back: at most 8 plain files, named in letters, digits, '.', '_', '-'.
    files = sorted(path.name for path in out.iterdir())
    assert files == ["run.log", "summary.json", "tuned.json"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    assert "===== llava-b32: ok" in (out / "run.log").read_text()
    # The dry run wrote its tuned file to a scratch folder, never into the repository.
    assert (tuned.read_bytes() if tuned.exists() else None) == before


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    gpu_run = load_gpu_run()
    child = "import subprocess, sys, time; "
    child += "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    step = gpu_run.Step(
        "sleepy", [sys.executable, "-c", child + "print('started', flush=True); time.sleep(60)"], 2, 1,
        gpu_run.parse_result,
    )  # fmt: skip
    log_path = tmp_path / "run.log"
    start = time.monotonic()
    with open(log_path, "ab") as log:
        record = gpu_run.run_step(step, log, log_path, {"PATH": "/usr/bin:/bin"}, limit=2)
    assert record["status"] == "timeout" and record["rc"] is None
    assert time.monotonic() - start < 20  # the grandchild holding the log did not keep it waiting
    assert "started" in log_path.read_text() and "===== sleepy: timeout" in log_path.read_text()


def test_carried_wheels_the_image_already_has_in_range_are_not_installed(tmp_path):
    gpu_run = load_gpu_run()
    names = [
        "transformers-5.23.0-py3-none-any.whl",
        "dill-0.4.1-py3-none-any.whl",
        "nosuch_pkg-1.0-py3-none-any.whl",
    ]
    wheels = [tmp_path / name for name in names]
    chosen, kept = gpu_run.select_wheels(wheels)
    # transformers here is in pyproject's range: kept; dill is not in pyproject: installed; a
    # package not installed at all: installed.
    assert [w.name for w in chosen] == names[1:]
    assert "pyproject's range" in kept[names[0]]


def test_parsers_read_the_benchmark_tables():
    gpu_run = load_gpu_run()
    gpu_out = """llava 7b: 32 layers x 4096, cuda, float16, torch 2.11.0+cu130
batch 8, 607 positions (576 image)
  HF sdpa                                    195.4 ms   1.00x     5.12 items/s  peak +      53 MiB
  collect (3 lenses)                         283.3 ms   1.45x     3.53 items/s  peak +      76 MiB
dataset path, 128 images, batch 8, 4 DataLoader workers
  HF sdpa forward alone (batches prepared beforehand)    40.00 items/s
  run_phase_diagram, with image verbalization  (decode + processor + collector + Parquet + aggregates)"""
    gpu_out += "     29.30 items/s  (1.37x the forward's time)\n"
    numbers = gpu_run.parse_gpu(gpu_out)
    assert numbers["batch 8"]["positions"] == 607
    assert numbers["batch 8"]["collect (3 lenses)"] == dict(ms=283.3, x_sdpa=1.45, items_s=3.53, peak_mib=76)
    assert numbers["dataset path, items/s"] == {
        "HF sdpa forward alone": 40.0,
        "run_phase_diagram, with image verbalization": 29.3,
    }
    pytest_out = """PASSED tests/test_attention_lenses.py::test_triton_kernel_matches_pytorch_on_the_gpu[d0]
FAILED tests/test_attention_lenses.py::test_collector_on_the_gpu_matches_the_cpu - AssertionError: x
SKIPPED [3] tests/test_attention_lenses.py:106: needs a CUDA GPU
1 failed, 14 passed, 3 skipped in 31.90s"""
    numbers = gpu_run.parse_pytest(pytest_out)
    assert numbers["passed"] == 14 and numbers["failed"] == 1 and numbers["skipped"] == 3
    assert numbers["gpu_tests"] == {
        "test_triton_kernel_matches_pytorch_on_the_gpu[d0]": "PASSED",
        "test_collector_on_the_gpu_matches_the_cpu": "FAILED",
    }
    assert numbers["skipped_for_want_of_a_gpu"] == 3


def test_the_kernel_reads_its_launch_configuration_from_the_tuned_file(tmp_path):
    from hooked_vllm.kernels import attention_lenses as kernel

    assert kernel.load_launch(tmp_path / "absent.json") == kernel.DEFAULT_LAUNCH
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"query_block": 32, "num_warps": 4, "measured": {"ms": {}}}))
    assert kernel.load_launch(path) == {**kernel.DEFAULT_LAUNCH, "query_block": 32, "num_warps": 4}
    path.write_text(json.dumps({"key_block": 24}))
    with pytest.raises(ValueError, match="key_block=24, expected one of"):
        kernel.load_launch(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="expected a JSON object"):
        kernel.load_launch(path)
