"""Where a model comes from: the shipped demo by name, checkpoint folders checked before loading, hub ids
from the local cache offline, and an unreachable hub as one line at once (no retries, no traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from hooked_vllm import HookedVLM, ModelNotFoundError
from hooked_vllm.demo import MODEL_DIR
from hooked_vllm.model import loading
from tests.conftest import INSTRUCTIONS, ROOT, random_images

HAS_DEMO = (MODEL_DIR / "model.safetensors").is_file()


@pytest.mark.skipif(not HAS_DEMO, reason="no demo model")
def test_demo_by_name_is_the_shipped_model():
    by_name = HookedVLM.from_pretrained("demo")
    by_path = HookedVLM.from_pretrained(str(MODEL_DIR))
    batch = by_name.prepare(random_images(2), INSTRUCTIONS[:2])
    assert torch.equal(by_name(batch), by_path(batch))


@pytest.fixture
def hf_never_called(monkeypatch):
    """Hugging Face's loaders fail the test if they are reached (the source must be refused first)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"HF loading was reached with {args!r}")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)


def _one_line(info: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(info.value)
    assert isinstance(info.value, ModelNotFoundError) and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_an_uncached_hub_id_with_the_hub_unreachable_is_one_line_without_hf(monkeypatch, hf_never_called):
    monkeypatch.setattr(loading, "hub_reachable", lambda *args: False)
    with pytest.raises(ModelNotFoundError) as info:
        HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf")
    _one_line(info, "llava-hf/llava-1.5-7b-hf", "not in the local Hugging Face cache", "cannot be reached")


def test_the_hub_probe_gives_up_on_a_host_that_does_not_answer(monkeypatch):
    """A name lookup or connection that hangs counts as unreachable after the timeout."""
    import socket
    import time

    def hang(*args, **kwargs):
        time.sleep(5)
        raise OSError("no answer")

    monkeypatch.setattr(socket, "create_connection", hang)
    started = time.perf_counter()
    assert loading.hub_reachable(timeout_s=0.2) is False
    assert time.perf_counter() - started < 4  # gave up long before the hang ended


@pytest.mark.parametrize("case", ["empty", "no config", "bad json", "missing", "a file"])
def test_folders_without_a_checkpoint_are_one_line_without_hf(tmp_path, case, hf_never_called):
    folder = tmp_path / "model"
    folder.mkdir()
    if case == "no config":
        (folder / "weights.bin").write_bytes(b"x")
    elif case == "bad json":
        (folder / "config.json").write_text("{not json")
    elif case == "missing":
        folder = tmp_path / "nowhere"
    elif case == "a file":
        folder = folder / "config.txt"
        folder.write_text("x")
    with pytest.raises(ModelNotFoundError) as info:
        HookedVLM.from_pretrained(str(folder))
    _one_line(info, str(folder) if case != "bad json" else "config.json")


def test_a_folder_with_a_config_but_no_weights_is_one_line(tmp_path, model_dir):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelNotFoundError) as info:
        HookedVLM.from_pretrained(str(folder))
    _one_line(info, str(folder))


def test_a_cached_hub_id_loads_offline_from_the_cache(tmp_path, model_dir):
    """The Hugging Face cache's layout (models--org--name/snapshots/<rev>, refs/main), the hub
    unreachable: the model loads from the cache, equal to loading its folder."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-llava" / "snapshots" / "0123abcd"
    shutil.copytree(model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    script = textwrap.dedent(
        f"""
        import torch
        from hooked_vllm import HookedVLM
        from hooked_vllm.model import loading
        loading.hub_reachable = lambda *args: False
        cached = HookedVLM.from_pretrained("someone/tiny-llava")
        folder = HookedVLM.from_pretrained({str(model_dir)!r})
        batch = folder.prepare(["{ROOT / "hooked_vllm/runs/samples/chelsea.jpg"}"], ["Describe it."])
        print(torch.equal(cached(batch), folder(batch)))
        """
    )
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"


def test_the_cli_refuses_an_empty_model_folder_in_one_line_and_writes_nothing(tmp_path):
    from tests.conftest import cli

    (tmp_path / "empty").mkdir()
    done = cli("--model", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no config.json" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_cli_writes_nothing_before_the_model_has_loaded(tmp_path, model_dir, monkeypatch):
    """A model that fails while loading (here: its weights unreadable) leaves --out untouched."""
    from hooked_vllm.cli import main

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    code = main(["phase-diagram", "--model", str(folder), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and not (tmp_path / "out").exists()
    assert json.loads((folder / "config.json").read_text())  # the checkpoint itself untouched
