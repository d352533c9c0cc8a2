"""Issue 26, round 2, on the stores and hooks: no overflow stored silently, one folder never holds two
kinds of store, and a damaged store or a hook returning the wrong tensor is a one-line error naming
the file or the hook."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hooked_vllm import HookedVLMError
from hooked_vllm.activations.store import ActivationStore, ActivationStoreError
from hooked_vllm.cli import main as cli_main
from hooked_vllm.runs.datasets import DatasetItem
from hooked_vllm.runs.store import ResultStore
from hooked_vllm.testing import tiny_llava
from tests.conftest import INSTRUCTIONS, make_coco, random_images

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


# ---------------------------------------------------------------- 4. one folder, one kind of store
def _phase_args(model_dir: Path, coco: Path, out: Path) -> list[str]:
    return [
        "phase-diagram",
        "--no-progress",
        "--model",
        str(model_dir),
        "--dataset",
        "coco",
        "--data-dir",
        str(coco),
        "--out",
        str(out),
    ]


def _cache_args(model_dir: Path, images: Path, out: Path) -> list[str]:
    return [
        "cache-activations",
        "--no-progress",
        "--model",
        str(model_dir),
        "--dataset",
        "folder",
        "--data-dir",
        str(images),
        "--hooks",
        "blocks.0.hook_resid_post",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["marked", "previous-version"])
def test_a_results_folder_is_refused_by_cache_activations(llava, tmp_path, model_dir, capsys, legacy):
    out, coco = tmp_path / "out", make_coco(tmp_path / "coco", n_images=2)
    _items(tmp_path / "images", 2)
    assert cli_main(_phase_args(model_dir, coco, out)) == 0
    if legacy:  # a run.json as the previous version wrote it: no kind
        settings = json.loads((out / "run.json").read_text())
        settings.pop("kind", None)
        (out / "run.json").write_text(json.dumps(settings))
    rows, _ = ResultStore(out).read()
    before = _snapshot(out)
    capsys.readouterr()
    err = _one_line(cli_main(_cache_args(model_dir, tmp_path / "images", out)), capsys.readouterr().err)
    assert "phase-diagram" in err and "another --out" in err
    assert _snapshot(out) == before  # nothing written into it
    items = _items(tmp_path / "images", 2)
    with pytest.raises(HookedVLMError, match="phase-diagram"):
        ActivationStore.write(llava.vlm, items, out, hooks=["hook_embed"], progress=False)
    assert _snapshot(out) == before
    with pytest.raises(ActivationStoreError, match="not an activation store but a phase-diagram results"):
        ActivationStore.open(out)
    assert ResultStore(out).read()[0] == rows
    assert cli_main(_phase_args(model_dir, coco, out)) == 0
    assert "2 of 2 items were already done" in capsys.readouterr().out


@pytest.mark.parametrize("legacy", [False, True], ids=["marked", "previous-version"])
def test_an_activation_store_is_refused_by_phase_diagram(tmp_path, model_dir, capsys, legacy):
    out, coco = tmp_path / "out", make_coco(tmp_path / "coco", n_images=2)
    _items(tmp_path / "images", 2)
    assert cli_main(_cache_args(model_dir, tmp_path / "images", out)) == 0
    if legacy:
        settings = json.loads((out / "run.json").read_text())
        settings.pop("kind", None)
        settings.pop("format", None)  # and nothing else to tell: the files must
        (out / "run.json").write_text(json.dumps(settings))
    values = ActivationStore.open(out)[:]["blocks.0.hook_resid_post"]
    before = _snapshot(out)
    capsys.readouterr()
    err = _one_line(cli_main(_phase_args(model_dir, coco, out)), capsys.readouterr().err)
    assert "activation store" in err and "another --out" in err
    assert _snapshot(out) == before and not (out / "items").exists()
    with pytest.raises(HookedVLMError, match="activation store"):
        ResultStore(out, settings={"model": "x"}).open()
    assert _snapshot(out) == before and not (out / "items").exists()
    assert torch.equal(ActivationStore.open(out)[:]["blocks.0.hook_resid_post"], values)
    if not legacy:
        assert cli_main(_cache_args(model_dir, tmp_path / "images", out)) == 0
        assert "1 of 1 batches done" in capsys.readouterr().err


# ---------------------------------------------------------------- 10. damaged stores, wrong hooks
@pytest.fixture(scope="module")
def small_store(llava, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small-store")
    ActivationStore.write(
        llava.vlm, _items(root / "images"), root / "store", hooks=["hook_embed"], batch_size=2, progress=False
    )
    return root / "store"


def _damaged(small_store: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(small_store, copy)
    damage(copy)
    return copy


DAMAGE = {
    "run.json missing": ("run.json", lambda s: (s / "run.json").unlink()),
    "run.json corrupt": ("run.json", lambda s: (s / "run.json").write_text('{"hooks": [')),
    "state.json corrupt": ("state.json", lambda s: (s / "state.json").write_text("[1, 2")),
    "dataset_info.json corrupt": ("dataset_info.json", lambda s: (s / "dataset_info.json").write_text("{")),
    "shard missing": ("data-b0000001.arrow", lambda s: (s / "data-b0000001.arrow").unlink()),
    "shard truncated": (
        "data-b0000001.arrow",
        lambda s: (s / "data-b0000001.arrow").write_bytes((s / "data-b0000001.arrow").read_bytes()[:-300]),
    ),
    "shard garbage": ("data-b0000000.arrow", lambda s: (s / "data-b0000000.arrow").write_bytes(b"x" * 999)),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_store_is_one_line_naming_the_file(small_store, tmp_path, case):
    name, damage = DAMAGE[case]
    folder = _damaged(small_store, tmp_path, damage)
    with pytest.raises(HookedVLMError) as info:
        ActivationStore.open(folder)
    message = str(info.value)
    assert "\n" not in message and name in message, message


def test_a_hook_returning_the_wrong_shape_or_dtype_names_the_hook(llava, images):
    vlm, hook = llava.vlm, "blocks.1.hook_resid_post"
    batch = vlm.prepare(images[:2], INSTRUCTIONS[:2])
    expected = tuple(vlm.run_with_cache(batch, names_filter=[hook])[1][hook].shape)
    bad = {
        "shape": (lambda x, hook: x[:, :1], [str(expected), str((expected[0], 1, expected[2]))]),
        "dtype": (lambda x, hook: x.double(), ["float32", "float64"]),
        "type": (lambda x, hook: x.tolist(), ["list"]),
    }
    for what, (fn, says) in bad.items():
        with pytest.raises(HookedVLMError) as info:
            vlm.run_with_hooks(batch, fwd_hooks=[(hook, fn)])
        message = str(info.value)
        assert "\n" not in message and hook in message and all(s in message for s in says), (what, message)
        with pytest.raises(HookedVLMError, match=hook.replace(".", r"\.")):
            with vlm.hooks([(lambda name: name == hook, fn)]):
                vlm(batch)
    # good hooks are unchanged: None, or a tensor of the same shape and dtype
    reference = vlm(batch)
    assert torch.equal(vlm.run_with_hooks(batch, fwd_hooks=[(hook, lambda x, hook: None)]), reference)
    doubled = vlm.run_with_hooks(batch, fwd_hooks=[(hook, lambda x, hook: 2 * x)])
    assert not torch.allclose(doubled, reference)
