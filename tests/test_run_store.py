"""The run store as a database keeps it (settings stored with the results, one writer, every part
verified, nothing corrupt or doubled aggregated), and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hooked_vllm import cli as hooked_cli
from hooked_vllm.cli.common import UsageError
from hooked_vllm.runs.datasets import DatasetItem, DatasetSample, load_coco
from hooked_vllm.runs.store import (
    RESULTS_KIND,
    ResultStore,
    RunLockedError,
    RunStoreError,
    SettingsMismatchError,
    settings_differences,
)
from tests.conftest import ROOT, cli, make_coco, make_winoground

SETTINGS = {"model": "m", "n": 4, "seed": 0, "device": "cpu", "no_verbalize_images": False}


def _rows(ids):
    return [{"item_id": i, "value": float(len(i))} for i in ids]


def _vectors(seed=0):
    rng = np.random.default_rng(seed)
    return {"sum_image": rng.normal(size=(3, 4)), "sum_text": rng.normal(size=(3, 4))}


def _store_with_parts(out: Path, batches, settings=SETTINGS) -> list[Path]:
    with ResultStore(out, settings=settings) as store:
        return [store.write(_rows(ids), _vectors(n)) for n, ids in enumerate(batches)]


# ---------------------------------------------------------------- the store, unit by unit
def test_temp_files_and_other_ranks_leftovers_are_never_parts(tmp_path):
    _store_with_parts(tmp_path, [["a", "b"]])
    items = tmp_path / "items"
    pq.write_table(pa.Table.from_pylist(_rows(["x"])), items / "part-r1-000003.r1.tmp.parquet")  # old naming
    pq.write_table(pa.Table.from_pylist(_rows(["y"])), items / "tmp-part-r1-000004.parquet")
    with ResultStore(tmp_path, settings=SETTINGS) as store:
        assert [p.name for p in store.parts()] == ["part-r0-000000.parquet"]
        assert store.done_ids() == {"a", "b"}
    assert (items / "tmp-part-r1-000004.parquet").exists()  # another rank's: left to its owner


def test_a_second_writer_is_refused_and_told_who_holds_the_lock(tmp_path):
    first = ResultStore(tmp_path, settings=SETTINGS).open()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on .*Wait for it"):
        ResultStore(tmp_path, settings=SETTINGS).open()
    first.close()
    ResultStore(tmp_path, settings=SETTINGS).open().close()


def test_corrupt_parts_are_reported_then_set_aside_with_repair(tmp_path):
    parts = _store_with_parts(tmp_path, [["a"], ["b"], ["c"], ["d"]])
    parts[1].write_bytes(parts[1].read_bytes()[:40])  # a truncated Parquet file
    npz = parts[2].with_suffix(".npz")
    npz.write_bytes(npz.read_bytes()[:100])  # a truncated .npz beside a good Parquet file
    parts[3].with_suffix(".npz").unlink()
    bad = r"3 bad part\(s\).*000001.parquet does not match its checksum.*000002.npz does not match"
    with pytest.raises(RunStoreError, match=bad + r".*000003.npz is missing.*--repair"):
        ResultStore(tmp_path, settings=SETTINGS).open()
    with ResultStore(tmp_path, settings=SETTINGS, repair=True) as store:
        assert store.done_ids() == {"a"}
        rows, sums = store.read()
    assert [row["item_id"] for row in rows] == ["a"]
    np.testing.assert_array_equal(sums["sum_image"], _vectors(0)["sum_image"])
    kept = sorted(p.name for p in (tmp_path / "items" / "quarantine").iterdir())
    set_aside = [f"part-r0-00000{n}.{ext}" for n in (1, 2) for ext in ("npz", "parquet", "sha256")]
    assert kept == [*set_aside, "part-r0-000003.parquet", "part-r0-000003.sha256"]


def test_a_part_repeating_another_is_reported_and_never_aggregated(tmp_path):
    parts = _store_with_parts(tmp_path, [["a", "b"], ["c"]])
    for suffix in (".parquet", ".npz"):
        shutil.copy(parts[0].with_suffix(suffix), tmp_path / "items" / f"part-r1-000000{suffix}")
    with pytest.raises(RunStoreError, match="repeats item.*a, b"):
        ResultStore(tmp_path, settings=SETTINGS).open()
    with ResultStore(tmp_path, settings=SETTINGS, repair=True) as store:
        rows, sums = store.read()
    assert [row["item_id"] for row in rows] == ["a", "b", "c"]
    np.testing.assert_allclose(sums["sum_text"], _vectors(0)["sum_text"] + _vectors(1)["sum_text"])


def test_settings_live_in_the_parts_so_a_lost_run_json_never_mixes_runs(tmp_path):
    _store_with_parts(tmp_path, [["a"]])
    (tmp_path / "run.json").unlink()
    other = {**SETTINGS, "seed": 3}
    with pytest.raises(RunStoreError, match="no run.json.*carry other or no settings"):
        ResultStore(tmp_path, settings=other, repair=True).open()
    with pytest.raises(RunStoreError, match="no run.json.*--repair"):
        ResultStore(tmp_path, settings=SETTINGS).open()
    with ResultStore(tmp_path, settings=SETTINGS, repair=True) as store:  # every part agrees: restored
        assert store.done_ids() == {"a"}
    assert json.loads((tmp_path / "run.json").read_text()) == {"kind": RESULTS_KIND, **SETTINGS}  # types kept
    (tmp_path / "run.json").write_text(json.dumps(other))  # a run.json that lies about the parts
    with pytest.raises(SettingsMismatchError, match="seed"):
        ResultStore(tmp_path, settings=other).open()


def test_settings_compare_as_values():
    legacy = {"model": "m", "n": "4", "seed": "0", "device": "cpu", "out": "relative/out"}
    assert settings_differences(legacy, {**SETTINGS, "no_verbalize_images": None}) == []
    assert settings_differences(legacy, SETTINGS) == ["no_verbalize_images"]  # absent, not False
    assert settings_differences({**SETTINGS, "out": "a"}, {**SETTINGS, "out": "/b"}) == []
    assert settings_differences(SETTINGS, {**SETTINGS, "n": 5}) == ["n"]


# ---------------------------------------------------------------- the runner
def test_duplicate_item_ids_are_refused_before_any_compute(tmp_path, model_dir, monkeypatch):
    from hooked_vllm import HookedVLM
    from hooked_vllm.runs import phase_diagram as experiment

    sample = load_coco(make_coco(tmp_path / "coco", n_images=3))
    doubled = DatasetSample("coco", [*sample.items, DatasetItem(sample.items[0].item_id, Path("x.jpg"), "q")])
    calls = []
    monkeypatch.setattr(experiment, "collect", lambda *a, **k: calls.append(a))
    with pytest.raises(RunStoreError, match=f"repeats item id.*{sample.items[0].item_id}"):
        experiment.run_phase_diagram(HookedVLM.from_pretrained(str(model_dir)), doubled, tmp_path / "o")
    assert calls == [] and not (tmp_path / "o").exists()


def test_a_repaired_run_equals_a_clean_run(tmp_path, model_dir):
    from hooked_vllm import HookedVLM
    from hooked_vllm.runs.phase_diagram import run_phase_diagram

    vlm = HookedVLM.from_pretrained(str(model_dir))
    sample = load_coco(make_coco(tmp_path / "coco", n_images=6))
    clean = run_phase_diagram(vlm, sample, tmp_path / "clean", batch_size=2, progress=False)
    damaged = tmp_path / "damaged"
    run_phase_diagram(vlm, sample, damaged, batch_size=2, progress=False)
    part = sorted((damaged / "items").glob("part-*.parquet"))[1]
    part.write_bytes(part.read_bytes()[:-30])
    with pytest.raises(RunStoreError, match="part-r0-000001.parquet.*--repair"):
        run_phase_diagram(vlm, sample, damaged, batch_size=2, progress=False)
    repaired = run_phase_diagram(vlm, sample, damaged, batch_size=2, progress=False, repair=True)
    assert repaired.n_resumed == 4 and repaired.n_items == 6
    _assert_same_aggregates(repaired.aggregates, clean.aggregates)


def _assert_same_aggregates(got: dict, want: dict) -> None:
    assert got["n_items"] == want["n_items"]
    for group, stats in want["contextualization"].items():
        for key in ("mean", "adjusted_mean", "ci95"):
            np.testing.assert_allclose(
                got["contextualization"][group][key], stats[key], rtol=1e-9, atol=1e-12
            )
    for pair, stats in want["norm_attention"].items():
        np.testing.assert_allclose(got["norm_attention"][pair]["mean"], stats["mean"], rtol=1e-9, atol=1e-12)
    assert got["phases"] == want["phases"]


# ---------------------------------------------------------------- the CLI
def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``hooked-vllm phase-diagram ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        code = hooked_cli.main(["phase-diagram", "--no-progress", *args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert "error:" in err
    return err


def test_bad_flags_and_inputs_are_one_line_errors(tmp_path, model_dir, capsys):
    coco = make_coco(tmp_path / "coco", n_images=2)
    bad_coco = make_coco(tmp_path / "bad-coco", n_images=2)
    annotation = bad_coco / "annotations" / "captions_val2014.json"
    annotation.write_text(json.dumps({"images": {"id": 1}, "annotations": []}))
    bad_wino = make_winoground(tmp_path / "bad-wino", 1)
    (bad_wino / "examples.jsonl").write_text('[1, 2, 3]\n["image_0"]\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    model = ["--model", str(model_dir)]
    cases = {
        "--n 0": (["--n", "0"], "at least 1"),
        "negative --n": (["--num-items", "-3"], "at least 1"),
        "--batch-size 0": (["--batch-size", "0"], "at least 1"),
        "--data-dir for samples": ([*model, "--data-dir", str(coco)], "does not read it"),
        "coco without --data-dir": ([*model, "--dataset", "coco"], "needs --data-dir"),
        "--out is a file": (["--out", str(a_file)], "is a file"),
        "--out cannot be created": (["--out", "/proc/hooked-vllm-out"], "Cannot create"),
        "--device nonsense": (["--device", "quantum"], "not a device name"),
        "COCO images of the wrong type": ([*model, "--dataset", "coco", "--data-dir", str(bad_coco)], "coco"),
        "Winoground lines that are lists": (
            [*model, "--dataset", "winoground", "--data-dir", str(bad_wino)],
            "examples.jsonl",
        ),
        "no such model folder": (["--model", str(tmp_path / "no-model")], "no such model folder"),
    }
    if not torch.cuda.is_available():
        cases["--device cuda without a GPU"] = (["--device", "cuda"], "CUDA is not available")
    for name, (args, says) in cases.items():
        out = [] if "--out" in args else ["--out", str(tmp_path / "out" / name.replace(" ", "-"))]
        code, _, err = run_cli(capsys, *args, *out)
        assert says in _one_line_error(code, err), (name, err)
    code, _, err = run_cli(capsys, "--n", "0", "--debug")
    assert code == 2  # a bad flag is argparse's one line even with --debug
    with pytest.raises(UsageError):
        hooked_cli.main(["phase-diagram", *model, "--data-dir", str(coco), "--debug"])


def test_a_refused_run_writes_nothing_so_the_corrected_run_starts(tmp_path, model_dir, capsys):
    data = make_coco(tmp_path / "coco", n_images=2)
    out = tmp_path / "o"
    common = ["--model", str(model_dir), "--dataset", "coco", "--data-dir", str(data), "--out", str(out)]
    _one_line_error(*run_cli(capsys, *common, "--batch-size", "0")[::2])
    assert not (out / "run.json").exists()
    code, stdout, err = run_cli(capsys, *common, "--batch-size", "2")
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["batch_size"] == 2  # a number, not "2"


def test_the_same_run_named_differently_resumes(tmp_path, model_dir, capsys, monkeypatch):
    data = make_coco(tmp_path / "coco", n_images=3)
    monkeypatch.chdir(tmp_path)
    relative = ["--model", str(model_dir), "--dataset", "coco", "--data-dir", "coco", "--out", "o"]
    code, _, err = run_cli(capsys, *relative)
    assert code == 0, err
    absolute = [
        "--model",
        str(model_dir),
        "--dataset",
        "coco",
        "--data-dir",
        str(data),
        "--out",
        str(tmp_path / "o"),
    ]
    code, stdout, err = run_cli(capsys, *absolute, "--device", "cpu")
    assert code == 0, err
    assert "resumed: 3 of 3 items were already done" in stdout
    code, _, err = run_cli(capsys, *absolute, "--seed", "1")
    assert "seed differ" in _one_line_error(code, err)


def test_a_deleted_run_json_never_lets_a_resume_mix_settings(tmp_path, model_dir, capsys):
    data = make_coco(tmp_path / "coco", n_images=3)
    out = tmp_path / "o"
    common = ["--model", str(model_dir), "--dataset", "coco", "--data-dir", str(data), "--out", str(out)]
    assert run_cli(capsys, *common)[0] == 0
    before = json.loads((out / "aggregates.json").read_text())
    (out / "run.json").unlink()
    for other in (["--seed", "2"], ["--dtype", "bfloat16"], ["--no-verbalize-images"]):
        code, _, err = run_cli(capsys, *common, *other)
        assert "no run.json" in _one_line_error(code, err) and "carry other or no settings" in err, other
    code, _, err = run_cli(capsys, *common)
    assert "--repair" in _one_line_error(code, err)
    code, stdout, err = run_cli(capsys, *common, "--repair")
    assert code == 0, err
    assert "resumed: 3 of 3" in stdout
    assert json.loads((out / "aggregates.json").read_text()) == before


def test_torchrun_passes_the_readme_command_through(capsys):
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser()
    ours = ["phase-diagram", "--model", "demo", "--num-items", "64", "--batch-size", "8"]
    args = torchrun.parse_args(["--nproc-per-node", "4", "-m", "hooked_vllm.cli", *ours])
    assert args.training_script == "hooked_vllm.cli" and args.training_script_args == ours
    assert hooked_cli.build_parser().parse_args(args.training_script_args).n == 64
    with pytest.raises(SystemExit):  # why --num-items exists: torchrun reads --n as its own prefix
        torchrun.parse_args(["--nproc-per-node", "4", "-m", "hooked_vllm.cli", "phase-diagram", "--n", "64"])
    capsys.readouterr()


def test_a_subprocess_error_is_one_line_on_stderr(tmp_path):
    done = cli("--num-items", "0", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr


# ---------------------------------------------------------------- faults
@pytest.mark.slow
def test_two_processes_on_one_out_killed_at_random_points_then_resumed(tmp_path, model_dir):
    """Two runs start on one --out; at random moments one is killed (kill -9), then the other; N
    rounds; then a resume. The loser of the lock always says who holds it; the store never holds a
    bad or doubled part; the final result equals a clean run (1e-9), every round."""
    seed = int(os.environ.get("HOOKED_VLLM_FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    data = make_coco(tmp_path / "coco", n_images=60)
    common = ["--model", str(model_dir), "--dataset", "coco", "--data-dir", str(data), "--batch-size", "1"]
    clean = cli(*common, "--out", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-2000:]
    want = json.loads((tmp_path / "clean" / "aggregates.json").read_text())

    out = tmp_path / "contended"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "hooked_vllm.cli", "phase-diagram", "--no-progress", *common]
    parts = lambda: len(list((out / "items").glob("part-*.parquet"))) if (out / "items").is_dir() else 0  # noqa: E731
    for round_ in range(3):
        procs = [
            subprocess.Popen(
                [*command, "--out", str(out)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        target, deadline = parts() + rng.randint(1, 8), time.time() + 120
        while time.time() < deadline and any(p.poll() is None for p in procs):
            loser_out = any(p.poll() is not None for p in procs) or time.time() > deadline - 100
            if parts() >= target and loser_out:
                break
            time.sleep(0.005)
        for proc in rng.sample(procs, 2):  # one at a random point mid-run, then the other
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        codes = []
        for proc in procs:
            proc.wait()
            err = proc.stderr.read()
            codes.append(proc.returncode)
            assert proc.returncode in (0, 2, -signal.SIGKILL), (seed, round_, err[-2000:])
            if proc.returncode == 2:
                assert "being written by another run (pid" in err, (seed, round_, err)
        assert codes.count(2) <= 1, (seed, round_, codes)  # never both refused
        with ResultStore(out) as store:  # verifies every part: raises on a bad or doubled one
            assert len(store.done_ids()) <= 60
    resumed = cli(*common, "--out", str(out))
    assert resumed.returncode == 0, (seed, resumed.stderr[-2000:])
    _assert_same_aggregates(json.loads((out / "aggregates.json").read_text()), want)
