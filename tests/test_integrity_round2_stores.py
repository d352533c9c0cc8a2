"""Issue 26, round 2, on the stores and hooks: no overflow stored silently, one folder never holds two
kinds of store, and a damaged store or a hook returning the wrong tensor is a one-line error naming
the file or the hook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hooked_vllm.activations.store import ActivationStore, ActivationStoreError
from hooked_vllm.cli import main as cli_main
from hooked_vllm.runs.datasets import DatasetItem
from hooked_vllm.testing import tiny_llava
from tests.conftest import INSTRUCTIONS, random_images

FLOAT16_MAX = 65504.0


def _items(directory: Path, n: int = 4) -> list[DatasetItem]:
    directory.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(random_images(n, seed=3)):
        image.save(directory / f"img-{i}.png")
    return [DatasetItem(f"item-{i}", directory / f"img-{i}.png", INSTRUCTIONS[i % 3]) for i in range(n)]


def _one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    return err


# ---------------------------------------------------------------- 2. no overflow stored silently
def test_a_float16_overflow_is_refused_naming_the_hook_and_float32_stores_it(llava, tmp_path):
    vlm, hook = llava.vlm, "blocks.0.hook_resid_post"
    items = _items(tmp_path / "images")
    scale = [(hook, lambda x, hook: x * 1e9)]  # added first: runs before the store's own hook
    write = dict(hooks=[hook], batch_size=2, progress=False)
    with vlm.hooks(scale):
        with pytest.raises(ActivationStoreError) as info:
            ActivationStore.write(vlm, items, tmp_path / "f16", dtype="float16", **write)
        full = ActivationStore.write(vlm, items, tmp_path / "f32", dtype="float32", **write)
        batch = vlm.prepare([vlm_image(i) for i in items[:2]], [i.instruction for i in items[:2]])
        _, cache = vlm.run_with_cache(batch, names_filter=[hook])
    message = str(info.value)
    assert "\n" not in message and hook in message and "65504" in message and "float32" in message
    largest = float(message.split("|x| = ")[1].split()[0])
    assert largest > FLOAT16_MAX
    assert not list((tmp_path / "f16").glob("data-*.arrow"))  # nothing stored as inf
    stored = full[:][hook]
    assert bool(torch.isfinite(stored).all()) and float(stored.abs().max()) > FLOAT16_MAX
    first = cache[hook][0][batch.image_mask[0]]
    assert torch.allclose(full.item("item-0")[hook], first, rtol=1e-6)


def vlm_image(item: DatasetItem):
    from hooked_vllm.model.images import load_image

    return load_image(item.image_path)


def test_cli_float16_overflow_is_one_line_with_exit_code_2(tmp_path, capsys):
    hf_model, processor = tiny_llava(seed=2, directory=tmp_path / "build")
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if "multi_modal_projector.linear_2" in name:
                parameter.mul_(1e7)
    hf_model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    _items(tmp_path / "images", 2)
    args = ["cache-activations", "--model", str(tmp_path / "model"), "--dataset", "folder"]
    args += ["--data-dir", str(tmp_path / "images"), "--hooks", "hook_visual_prefix", "--no-progress"]
    code = cli_main([*args, "--store-dtype", "float16", "--out", str(tmp_path / "f16")])
    err = _one_line(code, capsys.readouterr().err.strip().splitlines()[-1])
    assert "hook_visual_prefix" in err and "65504" in err
    assert cli_main([*args, "--store-dtype", "float32", "--out", str(tmp_path / "f32")]) == 0
    stored = ActivationStore.open(tmp_path / "f32")[:]["hook_visual_prefix"]
    assert bool(torch.isfinite(stored).all()) and float(stored.abs().max()) > FLOAT16_MAX


def test_values_already_infinite_or_nan_are_stored_as_they_are(llava, tmp_path):
    vlm, hook = llava.vlm, "blocks.0.hook_resid_post"

    def poison(x, hook):
        x = x.clone()
        x[..., 0], x[..., 1] = float("inf"), float("nan")
        return x

    with vlm.hooks([(hook, poison)]):
        store = ActivationStore.write(
            vlm, _items(tmp_path / "images", 2), tmp_path / "s", hooks=[hook], dtype="float16", progress=False
        )
    values = store[:][hook]
    assert bool(torch.isinf(values[:, 0]).all()) and bool(torch.isnan(values[:, 1]).all())
    assert bool(torch.isfinite(values[:, 2:]).all())
