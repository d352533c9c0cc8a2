"""Datasets in their published formats, the resumable runner, data parallel runs, the CLI and report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hooked_vllm.errors import ImageLoadError
from hooked_vllm.runs.datasets import DatasetError, load_coco, load_dataset, load_winoground
from tests.conftest import ROOT, cli, make_coco, make_winoground


# ---------------------------------------------------------------- datasets
def test_coco_and_winoground_formats(tmp_path):
    coco = load_coco(make_coco(tmp_path / "coco"), n=4, seed=1)
    assert len(coco.items) == 4 and len({i.item_id for i in coco.items}) == 4
    assert coco.items == load_coco(tmp_path / "coco", n=4, seed=1).items  # seeded
    assert coco.items != load_coco(tmp_path / "coco", n=4, seed=2).items
    assert all(item.meta["captions"] for item in coco.items)
    wino = load_winoground(make_winoground(tmp_path / "wino"), n=2, seed=0)
    assert len(wino.items) == 8  # two examples x (2 images x 2 captions)
    matches = [item.meta["match"] for item in wino.items]
    assert matches.count(True) == 4
    assert '"the mat is on the cat"' in wino.items[1].instruction


def test_dataset_errors(tmp_path):
    root = make_coco(tmp_path / "coco", n_images=2)
    annotation = root / "annotations" / "captions_val2014.json"
    data = json.loads(annotation.read_text())
    data["images"][0]["file_name"] = "../../etc/passwd"
    annotation.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="outside the data folder"):
        load_coco(root)
    with pytest.raises(DatasetError, match="captions_val2014.json"):
        load_coco(tmp_path / "nothing-here")
    empty = make_coco(tmp_path / "empty", n_images=0)
    with pytest.raises(DatasetError, match="no images"):
        load_coco(empty)
    with pytest.raises(DatasetError, match="data-dir"):
        load_dataset("coco", None)


def test_missing_and_corrupt_images_fail_or_are_skipped_and_listed(tmp_path):
    root = make_winoground(tmp_path / "wino", n_examples=2)
    (root / "images" / "ex_0_img_1.png").write_bytes(b"not a png")
    (root / "images" / "ex_1_img_0.png").unlink()
    with pytest.raises(ImageLoadError, match="skip-bad"):
        load_winoground(root)
    sample = load_winoground(root, skip_bad=True)
    assert len(sample.items) == 4 and len(sample.skipped) == 2
    assert {Path(p).name for p, _ in sample.skipped} == {"ex_0_img_1.png", "ex_1_img_0.png"}


# ---------------------------------------------------------------- end to end
def test_cli_end_to_end_on_both_formats(tmp_path, model_dir):
    for name, data in (
        ("coco", make_coco(tmp_path / "coco")),
        ("winoground", make_winoground(tmp_path / "wino", 2)),
    ):
        out = tmp_path / f"out-{name}"
        args = ["--model", str(model_dir), "--dataset", name, "--data-dir", str(data)]
        args += ["--n", "4", "--batch-size", "3", "--out", str(out)]
        done = cli(*args)
        assert done.returncode == 0, done.stderr[-2000:]
        for file in (
            "aggregates.json",
            "aggregates.csv",
            "report.html",
            "phase_diagram.png",
            "attention.png",
        ):
            assert (out / file).stat().st_size > 0, file
        aggregates = json.loads((out / "aggregates.json").read_text())
        assert aggregates["n_items"] == (4 if name == "coco" else 8)
        assert len(aggregates["contextualization"]["inter"]["mean"]) == 4  # embedding + 3 layers
        assert "intra-modal encoding" in (out / "report.html").read_text()
        # A second identical command resumes: nothing new to do, same aggregates.
        again = cli(*args)
        assert again.returncode == 0
        assert json.loads((out / "aggregates.json").read_text()) == aggregates


def test_killed_run_resumes_with_nothing_lost_or_doubled(tmp_path, model_dir):
    n_images = 32  # enough batches that the poll below always catches the run mid-way
    data = make_coco(tmp_path / "coco", n_images=n_images)
    common = ["--model", str(model_dir), "--dataset", "coco", "--data-dir", str(data), "--batch-size", "1"]
    clean = cli(*common, "--out", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-2000:]

    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hooked_vllm.cli",
            "phase-diagram",
            "--no-progress",
            *common,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "items").glob("part-*.parquet"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_parts = len(list((out / "items").glob("part-*.parquet")))
    assert 3 <= n_parts < n_images, "the run must be killed mid-way"
    resumed = cli(*common, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((out / "aggregates.json").read_text())
    want = json.loads((tmp_path / "clean" / "aggregates.json").read_text())
    assert got["n_items"] == want["n_items"] == n_images
    for group in ("intra_image", "intra_text", "inter"):
        np.testing.assert_allclose(
            got["contextualization"][group]["adjusted_mean"],
            want["contextualization"][group]["adjusted_mean"],
            rtol=1e-9,
            atol=1e-12,
        )


def test_settings_change_on_resume_is_refused(tmp_path, model_dir):
    data = make_coco(tmp_path / "coco", n_images=2)
    common = [
        "--model",
        str(model_dir),
        "--dataset",
        "coco",
        "--data-dir",
        str(data),
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli(*common).returncode == 0
    changed = cli(*common, "--seed", "3")
    assert changed.returncode == 2 and "seed" in changed.stderr


# ---------------------------------------------------------------- data parallel
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, model_dir: str, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from hooked_vllm import HookedVLM
        from hooked_vllm.runs.phase_diagram import run_phase_diagram

        vlm = HookedVLM.from_pretrained(model_dir)
        run_phase_diagram(vlm, load_coco(data, n=6, seed=0), out, batch_size=2, progress=False)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path, model_dir):
    from hooked_vllm import HookedVLM
    from hooked_vllm.runs.phase_diagram import run_phase_diagram

    data = make_coco(tmp_path / "coco", n_images=6)
    single = run_phase_diagram(
        HookedVLM.from_pretrained(str(model_dir)),
        load_coco(data, n=6),
        tmp_path / "one",
        batch_size=4,
        progress=False,
    )
    torch.multiprocessing.spawn(
        _rank_main,
        args=(2, _free_port(), str(model_dir), str(data), str(tmp_path / "two")),
        nprocs=2,
        join=True,
    )
    parts = sorted(p.name for p in (tmp_path / "two" / "items").glob("*.parquet"))
    assert any(p.startswith("part-r0") for p in parts) and any(p.startswith("part-r1") for p in parts)
    merged = json.loads((tmp_path / "two" / "aggregates.json").read_text())
    assert merged["n_items"] == single.n_items == 6
    for group in ("intra_image", "intra_text", "inter", "all"):
        for key in ("mean", "adjusted_mean", "ci95"):
            np.testing.assert_allclose(
                merged["contextualization"][group][key],
                single.aggregates["contextualization"][group][key],
                rtol=1e-9,
                atol=1e-12,
            )
    for pair, stats in single.aggregates["norm_attention"].items():
        np.testing.assert_allclose(merged["norm_attention"][pair]["mean"], stats["mean"], rtol=1e-9)
    assert merged["phases"] == single.aggregates["phases"]


def test_processor_runs_in_the_dataloader_workers(tmp_path, model_dir):
    """With workers, decoding and the processor happen in the worker processes (the main process
    only feeds the model) and the results are the same as without."""
    from hooked_vllm import HookedVLM
    from hooked_vllm.runs.phase_diagram import run_phase_diagram

    data = load_coco(make_coco(tmp_path / "coco", n_images=6), n=6)
    results, main_process_calls = {}, {}
    for workers in (0, 2):
        vlm = HookedVLM.from_pretrained(str(model_dir))
        prepare, calls = vlm.prepare, []

        def counted(*args, prepare=prepare, calls=calls, **kwargs):
            calls.append(os.getpid())
            return prepare(*args, **kwargs)

        vlm.prepare = counted
        results[workers] = run_phase_diagram(
            vlm, data, tmp_path / f"workers-{workers}", batch_size=4, workers=workers, progress=False
        )
        main_process_calls[workers] = len(calls)
    assert main_process_calls == {0: 2, 2: 0}
    for group, stats in results[0].aggregates["contextualization"].items():
        np.testing.assert_allclose(results[2].aggregates["contextualization"][group]["mean"], stats["mean"])
    for pair, stats in results[0].aggregates["norm_attention"].items():
        np.testing.assert_allclose(results[2].aggregates["norm_attention"][pair]["mean"], stats["mean"])


def test_cli_without_image_verbalization_and_resuming_older_runs(tmp_path, model_dir):
    """--no-verbalize-images drops the per-image logit lens from every item's row; it is a
    setting of the run, so resuming with the other value is refused, while a run.json written
    before the setting existed resumes as the default it had."""
    from hooked_vllm.runs.phase_diagram import ResultStore

    data = make_coco(tmp_path / "coco", n_images=4)
    common = ["--model", str(model_dir), "--dataset", "coco", "--data-dir", str(data), "--n", "4"]
    lean = tmp_path / "lean"
    done = cli(*common, "--out", str(lean), "--no-verbalize-images")
    assert done.returncode == 0, done.stderr[-2000:]
    rows, _ = ResultStore(lean).read()
    assert len(rows) == 4 and all("image_verbalization" not in row for row in rows)
    refused = cli(*common, "--out", str(lean))
    assert refused.returncode == 2 and "no_verbalize_images" in refused.stderr

    full = tmp_path / "full"
    assert cli(*common, "--out", str(full)).returncode == 0
    rows, _ = ResultStore(full).read()
    assert all(len(row["image_verbalization"]) > 0 for row in rows)
    manifest = json.loads((full / "run.json").read_text())
    del manifest["no_verbalize_images"]  # as the previous version wrote it
    (full / "run.json").write_text(json.dumps(manifest))
    assert cli(*common, "--out", str(full)).returncode == 0
