"""The activation store: every stored vector is the cached activation of its item and position,
resumes and data-parallel runs equal a clean run row for row, bad input is one line, and probes on
the demo model find the colour and shape of each patch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import datasets
import pytest
import torch

from hooked_vllm import HookedVLMError
from hooked_vllm.activations.run import StorePlan
from hooked_vllm.activations.shards import read_shard
from hooked_vllm.activations.store import (
    ActivationStore,
    ActivationStoreError,
    DiskBudgetError,
    HookSelectionError,
)
from hooked_vllm.cli import main as cli_main
from hooked_vllm.model.images import load_image
from hooked_vllm.runs.checksums import write_checksums
from hooked_vllm.runs.datasets import DatasetItem, DatasetSample
from tests.conftest import INSTRUCTIONS, ROOT, random_images

#: per family: an LM hook, a per-head hook (flattened), a vision-side hook and the visual prefix
HOOKS = {
    "llava": ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "vision.blocks.1.hook_resid_post"],
    "instructblip": ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "qformer.blocks.1.hook_resid_post"],
}
#: where image token 0 sits in each per-image hook's tokens: CLIP's CLS comes first (dropped by the
#: tiny LLaVA's "default" strategy); the Q-Former's queries come before its text
SOURCE = {"vision.": 1, "qformer.": 0, "hook_visual_prefix": 0}
META = ("item_id", "item_index", "position", "modality", "patch", "token_id", "token")


def _items(directory: Path, n: int = 5) -> list[DatasetItem]:
    """``n`` images on disk with instructions of different lengths (so batches are padded)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(random_images(n, seed=3)):
        if not (directory / f"img-{i}.png").exists():
            image.save(directory / f"img-{i}.png")
    return [DatasetItem(f"item-{i}", directory / f"img-{i}.png", INSTRUCTIONS[i % 3]) for i in range(n)]


def _reference(vlm, items, hooks, positions, batch_size, padding_side) -> dict:
    """Rows built from ``run_with_cache`` on the same batches, independently of the store's code."""
    rows: dict[str, list] = {key: [] for key in (*META, *hooks)}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = [load_image(item.image_path) for item in chunk]
        batch = vlm.prepare(images, [item.instruction for item in chunk], padding_side=padding_side)
        _, cache = vlm.run_with_cache(batch, names_filter=hooks)
        for b, item in enumerate(chunk):
            image = batch.image_mask[b]
            select = {"image": image, "text": batch.text_mask[b], "all": batch.attention_mask[b].bool()}
            image_columns = image.nonzero().flatten().tolist()
            strings = vlm.to_str_tokens(batch, index=b)
            for column in select[positions].nonzero().flatten().tolist():
                k = image_columns.index(column) if image[column] else -1
                modality = 0 if image[column] else 1 if batch.text_mask[b, column] else 2
                values = (
                    item.item_id,
                    start + b,
                    int(batch.position_ids[b, column]),
                    modality,
                    k,
                    int(batch.input_ids[b, column]),
                    strings[column],
                )
                for key, value in zip(META, values):
                    rows[key].append(value)
                for hook in hooks:
                    source = next((SOURCE[p] for p in SOURCE if hook.startswith(p)), None)
                    acts = cache[hook]
                    if hook == "hook_visual_prefix":  # [n_slots, d]: one image per item here
                        acts = acts.view(len(chunk), -1, acts.shape[-1])
                    if source is None:
                        vector = acts[b, column].flatten()
                    elif k >= 0:
                        vector = acts[b, source + k]
                    else:
                        vector = torch.full_like(acts[b, 0], float("nan"))
                    rows[hook].append(vector)
    return {key: torch.stack(v) if key in hooks else v for key, v in rows.items()}


def _assert_rows_equal(store: ActivationStore, want: dict) -> None:
    got = store[:]
    for key, values in want.items():
        if isinstance(values, torch.Tensor):
            assert got[key].dtype == values.dtype, key
            torch.testing.assert_close(got[key], values, rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert (got[key].tolist() if isinstance(got[key], torch.Tensor) else got[key]) == values, key


def _assert_same_stores(got: ActivationStore, want: ActivationStore) -> None:
    """Row for row, column for column, bit for bit (NaN equal to NaN: rows without a vector)."""
    assert got.dataset.features == want.dataset.features and len(got) == len(want)
    _assert_rows_equal(got, want[:])


# ---------------------------------------------------------------- round trip
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_every_stored_vector_is_the_cached_activation(family, tmp_path, padding_side):
    vlm, hooks = family.vlm, [*HOOKS[family.name], "hook_visual_prefix"]
    items = _items(tmp_path / "images")
    store = ActivationStore.write(
        vlm,
        items,
        tmp_path / "store",
        hooks=hooks,
        positions="all",
        batch_size=2,
        padding_side=padding_side,
        progress=False,
    )
    want = _reference(vlm, items, hooks, "all", 2, padding_side)
    _assert_rows_equal(store, want)
    rows = store[:]
    assert set(rows["modality"].tolist()) == {0, 1, 2}  # image, text and special rows all checked
    image = rows["modality"] == 0
    assert bool(rows["blocks.0.attn.hook_z"].isfinite().all())
    assert bool(rows[hooks[2]][image].isfinite().all()) and bool(rows[hooks[2]][~image].isnan().all())
    if family.name == "llava":  # 30 px / 6 px patches: a 5 x 5 grid, row-major
        assert torch.equal(rows["grid_row"][image], rows["patch"][image] // 5)
        assert torch.equal(rows["grid_col"][image], rows["patch"][image] % 5)
    else:  # Q-Former queries have no grid
        assert bool((rows["grid_row"] == -1).all()) and bool((rows["tile"] == -1).all())
    assert bool((rows["patch"][~image] == -1).all()) and bool((rows["image_index"][image] == 0).all())


def test_half_precision_is_the_rounding_and_datasets_reads_the_same(llava, tmp_path):
    vlm, hooks = llava.vlm, ["blocks.2.hook_resid_post", "hook_visual_prefix"]
    items = _items(tmp_path / "images", 6)
    full = ActivationStore.write(vlm, items, tmp_path / "f32", hooks=hooks, batch_size=4, progress=False)
    half = ActivationStore.write(
        vlm, items, tmp_path / "f16", hooks=hooks, batch_size=4, dtype="float16", progress=False
    )
    assert len(half) == len(full) == 6 * 25
    for hook in hooks:
        assert half[:][hook].dtype == torch.float16
        assert torch.equal(half[:][hook], full[:][hook].to(torch.float16))
    loaded = datasets.load_from_disk(str(tmp_path / "f16"))
    assert loaded.features["modality"].names == ["image", "text", "special"]
    as_torch = loaded.with_format("torch")
    pick = [149, 3, 77, 3, 0]
    for hook in hooks:
        assert torch.equal(as_torch[pick][hook], half[pick][hook].float())  # datasets gives float32
    assert as_torch[pick]["item_id"] == half[pick]["item_id"]
    assert half[-1]["position"] == half[149]["position"] and half[5]["token"] == "<img0:5>"
    rows = half.rows_of("item-4")
    assert rows == range(100, 125) and half.item_ids == [f"item-{i}" for i in range(6)]
    assert torch.equal(half.item("item-4")[hooks[0]], half[100:125][hooks[0]])


def test_forward_stops_after_the_deepest_stored_hook(llava, tmp_path):
    calls = []
    with llava.vlm.hooks([("blocks.2.hook_resid_post", lambda x, hook: calls.append(1))]):
        ActivationStore.write(
            llava.vlm,
            _items(tmp_path / "images", 2),
            tmp_path / "s",
            hooks=["blocks.0.hook_resid_post"],
            positions="last",
            progress=False,
        )
    assert calls == []
    store = ActivationStore.open(tmp_path / "s")
    assert len(store) == 2 and store[:]["modality"].tolist() == [2, 2]  # 'ASSISTANT:' is template


# ---------------------------------------------------------------- dataset scale
def _slow_run(model_dir: str, images: str, out: str) -> None:  # the killed subprocess
    from hooked_vllm import HookedVLM

    vlm = HookedVLM.from_pretrained(model_dir)
    prepare = vlm.prepare
    vlm.prepare = lambda *a, **k: (time.sleep(0.03), prepare(*a, **k))[1]
    ActivationStore.write(
        vlm,
        _items(Path(images), 32),
        out,
        hooks=HOOKS["llava"],
        positions="all",
        batch_size=1,
        progress=False,
    )


def test_killed_run_resumes_to_the_rows_of_a_clean_run(tmp_path, model_dir):
    from hooked_vllm import HookedVLM

    items = _items(tmp_path / "images", 32)
    out = tmp_path / "killed"
    code = (
        f"from tests.test_activation_store import _slow_run; _slow_run({str(model_dir)!r}, "
        f"{str(tmp_path / 'images')!r}, {str(out)!r})"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("data-b*.arrow"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(out.glob("data-b*.arrow")))
    assert 3 <= n_done < 32, "the run must be killed mid-way"
    vlm = HookedVLM.from_pretrained(str(model_dir))
    write = dict(hooks=HOOKS["llava"], positions="all", batch_size=1, progress=False)
    resumed = ActivationStore.write(vlm, items, out, **write)
    clean = ActivationStore.write(vlm, items, tmp_path / "clean", **write)
    _assert_same_stores(resumed, clean)
    assert resumed.item_ids == [i.item_id for i in items]
    assert (
        not list(out.glob("tmp-*")) and len(json.loads((out / "state.json").read_text())["_data_files"]) == 32
    )


def _rank_main(rank: int, world: int, port: int, model_dir: str, images: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from hooked_vllm import HookedVLM

        vlm = HookedVLM.from_pretrained(model_dir)
        ActivationStore.write(
            vlm,
            _items(Path(images), 7),
            out,
            hooks=HOOKS["llava"],
            positions="all",
            batch_size=2,
            progress=False,
        )
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_process_row_for_row(tmp_path, model_dir):
    from hooked_vllm import HookedVLM

    items = _items(tmp_path / "images", 7)
    single = ActivationStore.write(
        HookedVLM.from_pretrained(str(model_dir)),
        items,
        tmp_path / "one",
        hooks=HOOKS["llava"],
        positions="all",
        batch_size=2,
        progress=False,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (2, port, str(model_dir), str(tmp_path / "images"), str(tmp_path / "two"))
    torch.multiprocessing.spawn(_rank_main, args=args, nprocs=2, join=True)
    merged = ActivationStore.open(tmp_path / "two")
    _assert_same_stores(merged, single)
    ranks = {read_shard(p)[0].rank for p in (tmp_path / "two").glob("data-b*.arrow")}
    assert ranks == {0, 1}


def test_bad_shards_are_refused_then_set_aside_and_recomputed(llava, tmp_path):
    items, out = _items(tmp_path / "images", 6), tmp_path / "store"
    write = dict(hooks=["blocks.1.hook_resid_post"], batch_size=2, progress=False)
    clean = ActivationStore.write(llava.vlm, items, tmp_path / "clean", **write)
    ActivationStore.write(llava.vlm, items, out, **write)
    shard = out / "data-b0000001.arrow"
    shard.write_bytes(shard.read_bytes()[:-500])  # truncated
    shutil.copy(out / "data-b0000000.arrow", out / "data-b0000002.arrow")  # batch 0's items as batch 2,
    write_checksums(out / "data-b0000002.sha256", [out / "data-b0000002.arrow"])  # its checksum right
    bad = r"2 bad shard\(s\).*b0000001.arrow does not match its checksum.*b0000002.*not batch 2's"
    with pytest.raises(ActivationStoreError, match=bad + ".*--repair"):
        ActivationStore.write(llava.vlm, items, out, **write)
    repaired = ActivationStore.write(llava.vlm, items, out, repair=True, **write)
    _assert_same_stores(repaired, clean)
    assert sorted(p.name for p in (out / "quarantine").iterdir()) == [
        "data-b0000001.arrow",
        "data-b0000001.sha256",
        "data-b0000002.arrow",
        "data-b0000002.sha256",
    ]
    with pytest.raises(HookedVLMError, match="hooks differ"):
        ActivationStore.write(llava.vlm, items, out, **{**write, "hooks": ["blocks.0.hook_resid_post"]})
    (out / "run.json").unlink()
    with pytest.raises(ActivationStoreError, match="no run.json"):
        ActivationStore.write(llava.vlm, items, out, **write)
    ActivationStore.write(llava.vlm, items, out, repair=True, **write)  # every shard agrees: rewritten
    assert json.loads((out / "run.json").read_text())["hooks"] == ["blocks.1.hook_resid_post"]


def test_size_estimate_is_close_to_what_is_written(family, tmp_path):
    items = _items(tmp_path / "images", 6)
    for positions in ("image", "text", "all"):
        out = tmp_path / positions
        store = ActivationStore.write(
            family.vlm,
            items,
            out,
            hooks=["blocks.1.hook_resid_post"],
            positions=positions,
            batch_size=3,
            progress=False,
        )
        plan = StorePlan.for_model(
            family.vlm, ["blocks.1.hook_resid_post"], positions, None, items[0].instruction
        )
        rows, sizes = plan.estimate(family.vlm, items, 3, store.settings)
        assert sum(rows) == len(store)  # the rows are counted exactly, from the tokens alone
        written = sum(p.stat().st_size for p in out.glob("data-b*.arrow"))
        assert 0.9 < sum(sizes) / written < 1.1, (positions, sum(sizes), written)


# ---------------------------------------------------------------- bad input: one line each
def test_instructblip_vision_patches_are_refused_naming_the_hooks_that_map(family, tmp_path):
    if family.name != "instructblip":
        pytest.skip("LLaVA's vision patches map to image positions (tested above)")
    with pytest.raises(HookSelectionError, match="no language-model position.*qformer") as info:
        ActivationStore.write(
            family.vlm, _items(tmp_path, 1), tmp_path / "s", hooks=["vision.blocks.0.hook_resid_post"]
        )
    assert "\n" not in str(info.value)


def test_bad_input_is_a_one_line_error(llava, tmp_path, monkeypatch, model_dir, capsys):
    items = _items(tmp_path / "images", 2)
    cases = [
        (
            HookSelectionError,
            "Did you mean blocks.1.hook_resid_post",
            dict(hooks=["blocks.1.hook_resid_pots"]),
        ),
        (
            HookSelectionError,
            "per image.*--positions image",
            dict(hooks=["vision.blocks.0.hook_resid_post"], positions="last"),
        ),
        (HookSelectionError, "no vector per position", dict(hooks=["blocks.0.attn.hook_pattern"])),
        (HookSelectionError, "positions must be one of", dict(hooks=["hook_embed"], positions="images")),
        (HookSelectionError, "cannot be stored", dict(hooks=["hook_embed"], dtype="bfloat16")),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message) as info:
            ActivationStore.write(llava.vlm, items, tmp_path / "bad", progress=False, **kwargs)
        assert "\n" not in str(info.value)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 2000, 2000))
    with pytest.raises(DiskBudgetError, match=r"needs about [\d.]+ KB more .* 2\.0 KB free") as info:
        ActivationStore.write(llava.vlm, items, tmp_path / "full", hooks=["hook_embed"], progress=False)
    assert "\n" not in str(info.value) and not list((tmp_path / "full").glob("data-*"))
    capsys.readouterr()
    code = cli_main(
        [
            "cache-activations",
            "--model",
            str(model_dir),
            "--dataset",
            "folder",
            "--data-dir",
            str(tmp_path / "images"),
            "--hooks",
            "hook_embed",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: The store needs about") and "free" in err[-1]
    monkeypatch.undo()
    code = cli_main(
        [
            "cache-activations",
            "--model",
            str(model_dir),
            "--dataset",
            "folder",
            "--data-dir",
            str(tmp_path / "images"),
            "--hooks",
            "hook_visual_prefix",
            "--positions",
            "text",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    assert code == 2 and capsys.readouterr().err.count("\n") == 1


def test_cli_stores_a_folder_and_resumes(tmp_path, model_dir, capsys):
    _items(tmp_path / "images", 3)
    args = [
        "cache-activations",
        "--model",
        str(model_dir),
        "--dataset",
        "folder",
        "--data-dir",
        str(tmp_path / "images"),
        "--hooks",
        "blocks.0.hook_resid_post",
        "vision.blocks.0.hook_resid_post",
        "--store-dtype",
        "float16",
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert cli_main(args) == 0
    assert "stored 75 rows of 3 items" in capsys.readouterr().out
    assert cli_main(args) == 0
    assert "2 of 2 batches done" in capsys.readouterr().err
    store = ActivationStore.open(tmp_path / "out")
    assert store.settings["dataset"] == "folder" and store.item_ids[0] == "folder-img-0.png"
    assert store[0]["vision.blocks.0.hook_resid_post"].dtype == torch.float16
    assert cli_main([*args[:-3], "--positions", "all", *args[-3:]]) == 2
    assert "positions differ" in capsys.readouterr().err


# ---------------------------------------------------------------- the probing tutorial's pipeline
@pytest.mark.skipif(not (ROOT / "hooked_vllm/demo/model/model.safetensors").is_file(), reason="no demo model")
def test_probes_on_the_demo_model_find_colour_and_shape_per_patch(tmp_path):
    from hooked_vllm import HookedVLM
    from hooked_vllm.analysis.probing import linear_probe
    from hooked_vllm.demo import demo_model_dir, shapes

    n = 300
    examples = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + 40_000, n=n)
    items = []
    for i, example in enumerate(examples):
        example.image.save(tmp_path / f"{i}.png")
        items.append(DatasetItem(f"shapes-{i}", tmp_path / f"{i}.png", example.question))
    hooks = ["vision.blocks.0.hook_resid_post", "hook_visual_prefix", "blocks.0.hook_resid_post"]
    vlm = HookedVLM.from_pretrained(str(demo_model_dir()))
    store = ActivationStore.write(
        vlm,
        DatasetSample("shapes", items),
        tmp_path / "store",
        hooks=hooks,
        dtype="float16",
        batch_size=64,
        progress=False,
    )
    labels = torch.tensor([shapes.patch_labels(example.scene) for example in examples])  # [item, 2, patch]
    meta = store.rows(slice(None), columns=["item_index", "patch"])
    colour, kind = labels[meta["item_index"], 0, meta["patch"]], labels[meta["item_index"], 1, meta["patch"]]
    objects = (colour > 0).nonzero().flatten()
    test = meta["item_index"][objects] >= int(0.8 * n)
    for hook in hooks:
        x = store.rows(objects, columns=[hook])[hook].float()
        for target, floor in ((colour, 0.9), (kind, 0.8)):
            result = linear_probe(x[~test], target[objects][~test], x[test], target[objects][test])
            assert result.chance < 0.5 and result.accuracy > max(floor, result.chance + 0.3), (hook, result)


def test_a_second_writer_is_refused_and_told_who_holds_the_folder(llava, tmp_path):
    from hooked_vllm.runs.store import FolderLock, RunLockedError

    (tmp_path / "store").mkdir()
    holder = FolderLock(tmp_path / "store", 0)
    holder.acquire()
    try:
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} .*Wait for it"):
            ActivationStore.write(
                llava.vlm, _items(tmp_path / "images", 1), tmp_path / "store", hooks=["hook_embed"]
            )
    finally:
        holder.release()
    assert not list((tmp_path / "store").glob("data-*"))


# ---------------------------------------------------------------- other families
@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from tests.conftest import Family

    return Family("gemma3", tmp_path_factory.mktemp("gemma3-store"))


def test_gemma3_store_holds_the_cached_activations(gemma3, tmp_path):
    """Gemma 3's images give a fixed number of soft tokens: stored like LLaVA's, on a square grid;
    its pooled vision patches have no position and are refused."""
    vlm, hooks = gemma3.vlm, ["blocks.1.hook_resid_post", "hook_visual_prefix"]
    items = _items(tmp_path / "images")
    store = ActivationStore.write(
        vlm, items, tmp_path / "store", hooks=hooks, positions="all", batch_size=2, progress=False
    )
    _assert_rows_equal(store, _reference(vlm, items, hooks, "all", 2, "left"))
    rows = store[:]
    image = rows["modality"] == 0
    side = int(vlm.hf_model.config.mm_tokens_per_image**0.5)
    assert torch.equal(rows["grid_row"][image], rows["patch"][image] // side)
    with pytest.raises(HookSelectionError, match="average-pooled"):
        ActivationStore.write(
            vlm, items, tmp_path / "vision", hooks=["vision.blocks.0.hook_resid_post"], progress=False
        )


def test_families_with_varying_image_token_counts_are_refused(tmp_path):
    from tests.conftest import Family

    vlm = Family("qwen2_vl", tmp_path / "model").vlm
    with pytest.raises(HookedVLMError, match="varying number of image tokens"):
        ActivationStore.write(
            vlm,
            _items(tmp_path / "images"),
            tmp_path / "store",
            hooks=["blocks.0.hook_resid_post"],
            progress=False,
        )


def test_paligemma_store_maps_each_vision_patch_to_its_image_token(tmp_path):
    """PaliGemma projects every SigLIP patch to one image token (no pooling, no CLS): the vision
    tower's patch k is stored at image position k, next to the language model's vectors there."""
    from tests.conftest import Family

    vlm = Family("paligemma", tmp_path / "model").vlm
    hooks = ["vision.blocks.1.hook_resid_post", "hook_visual_prefix", "blocks.0.hook_resid_post"]
    items = _items(tmp_path / "images", 3)
    store = ActivationStore.write(
        vlm, items, tmp_path / "store", hooks=hooks, positions="image", batch_size=2, progress=False
    )
    rows = store[:]
    images = [load_image(item.image_path) for item in items]
    batch = vlm.prepare(images, [item.instruction for item in items])
    _, cache = vlm.run_with_cache(batch, names_filter=hooks)
    n = int(batch.image_mask[0].sum())
    assert len(store) == n * len(items)
    for r in range(len(store)):
        item, patch = int(rows["item_index"][r]), int(rows["patch"][r])
        vision = cache["vision.blocks.1.hook_resid_post"][item, patch]
        assert torch.allclose(rows["vision.blocks.1.hook_resid_post"][r], vision, rtol=0, atol=1e-6)
        prefix = cache["hook_visual_prefix"].view(len(items), n, -1)[item, patch]
        assert torch.allclose(rows["hook_visual_prefix"][r], prefix, rtol=0, atol=1e-6)
        position = batch.image_mask[item].nonzero().flatten()[patch]
        resid = cache["blocks.0.hook_resid_post"][item, position]
        assert torch.allclose(rows["blocks.0.hook_resid_post"][r], resid, rtol=0, atol=1e-5)
