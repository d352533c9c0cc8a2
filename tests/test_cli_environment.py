"""The environment and signals a run meets (issue 26, class 9): a WORLD_SIZE left without torchrun's
rendezvous address, ranks that never join, and SIGTERM, each said in one line with what was kept."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from tests.conftest import ROOT, make_coco


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _phase_diagram(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hooked_vllm.cli", "phase-diagram", "--no-progress", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_world_size_without_a_rendezvous_address_is_one_line(tmp_path, model_dir):
    done = _phase_diagram("--model", str(model_dir), "--out", str(tmp_path / "out"), env=_env(WORLD_SIZE="2"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0
    assert "WORLD_SIZE=2 is set but MASTER_ADDR and MASTER_PORT are not" in done.stderr
    assert "torchrun" in done.stderr and not (tmp_path / "out").exists()


def test_ranks_that_never_join_end_in_one_line_naming_the_rendezvous(tmp_path, model_dir):
    port = _free_port()
    env = _env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    started = time.perf_counter()
    done = _phase_diagram(
        "--model", str(model_dir), "--out", str(tmp_path / "out"), "--rendezvous-timeout", "2", env=env
    )
    assert time.perf_counter() - started < 120  # bounded: before, it waited for the other rank forever
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0
    assert f"rank 0 of 2: the other ranks did not join at 127.0.0.1:{port} within 2 s" in done.stderr
    assert not (tmp_path / "out").exists()


def test_sigterm_says_what_was_kept_and_the_run_resumes(tmp_path, model_dir):
    n_images = 24
    data = make_coco(tmp_path / "coco", n_images=n_images)
    out = tmp_path / "out"
    common = ["--model", str(model_dir), "--dataset", "coco", "--data-dir", str(data), "--batch-size", "1"]
    command = [sys.executable, "-m", "hooked_vllm.cli", "phase-diagram", "--no-progress", *common]
    proc = subprocess.Popen(
        [*command, "--out", str(out)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "items").glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    kept = len(list((out / "items").glob("part-*.parquet")))
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"terminated: finished batches are kept in {out}; run again to resume."
    )
    assert 2 <= kept < n_images, "the run must be stopped mid-way"
    resumed = _phase_diagram(*common, "--out", str(out), env=_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed: {kept} of {n_images} items were already done" in resumed.stdout
    assert json.loads((out / "aggregates.json").read_text())["n_items"] == n_images
