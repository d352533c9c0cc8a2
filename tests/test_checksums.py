"""Issue 26, class 1: a store's bytes are checked, not trusted. A byte flipped anywhere in a Parquet part,
its ``.npz``, an Arrow shard or a checksum file is detected on open, on resume and by ``--repair``
(which sets the part aside and recomputes it); a wrong value is never read back as good."""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from hooked_vllm import HookedVLMError
from hooked_vllm.activations.store import ActivationStore, ActivationStoreError
from hooked_vllm.cli import main as cli_main
from hooked_vllm.runs.datasets import DatasetItem
from hooked_vllm.runs.store import ResultStore, RunStoreError
from tests.conftest import INSTRUCTIONS, make_coco, random_images

SETTINGS = {"model": "m", "n": 3, "seed": 0}
FLIPS_PER_FILE = 40


def _flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01 << (position % 8)
    path.write_bytes(bytes(data))


def _positions(path: Path, seed: int) -> list[int]:
    """Seeded byte positions over the whole file: its first and last bytes, then random ones."""
    size = path.stat().st_size
    rng = random.Random(f"{seed}-{path.name}")
    return [0, size - 1, *rng.sample(range(size), min(size, FLIPS_PER_FILE) - 2)]


# ---------------------------------------------------------------- the phase-diagram store
def _rows(ids: list[str]) -> list[dict]:
    return [{"item_id": i, "value": float(len(i)), "curve": [0.25 * len(i), 1.5]} for i in ids]


def _vectors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sum_image": rng.normal(size=(3, 4)), "sum_text": rng.normal(size=(3, 4))}


@pytest.fixture(scope="module")
def results_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("results") / "run"
    with ResultStore(out, settings=SETTINGS) as store:
        for n, ids in enumerate([["a", "b"], ["c"], ["d", "e"]]):
            store.write(_rows(ids), _vectors(n))
    return out


def test_every_byte_flip_in_a_part_is_detected_and_repair_keeps_only_good_values(results_store, tmp_path):
    items = results_store / "items"
    files = [p for p in sorted(items.iterdir()) if p.name.startswith("part-r0-000001.")]
    assert {p.suffix for p in files} == {".parquet", ".npz", ".sha256"}
    flips = 0
    for path in files:
        for position in _positions(path, seed=0):
            copy = tmp_path / f"flip-{flips}"
            shutil.copytree(results_store, copy)
            _flip(copy / "items" / path.name, position)
            with pytest.raises(RunStoreError, match=r"1 bad part\(s\): part-r0-000001\.parquet: .*--repair"):
                ResultStore(copy, settings=SETTINGS).open()
            with ResultStore(copy, settings=SETTINGS, repair=True) as store:
                rows, sums = store.read()
            assert rows == _rows(["a", "b", "d", "e"])  # part 1 set aside; nothing wrong read as good
            for key in ("sum_image", "sum_text"):
                np.testing.assert_array_equal(sums[key], _vectors(0)[key] + _vectors(2)[key])
            assert (copy / "items" / "quarantine" / path.name).exists()
            shutil.rmtree(copy)
            flips += 1
    assert flips == 3 * FLIPS_PER_FILE


def test_a_flipped_part_is_refused_on_resume_and_repair_recomputes_it(tmp_path, model_dir, capsys):
    coco = make_coco(tmp_path / "coco", n_images=4)

    def run(out: Path, *flags: str) -> tuple[int, str]:
        code = cli_main(
            ["phase-diagram", "--no-progress", "--model", str(model_dir), "--dataset", "coco"]
            + ["--data-dir", str(coco), "--batch-size", "2", "--out", str(out), *flags]
        )
        return code, capsys.readouterr().err

    assert run(tmp_path / "clean")[0] == 0
    assert run(tmp_path / "run")[0] == 0
    part = tmp_path / "run" / "items" / "part-r0-000001.parquet"
    _flip(part, part.stat().st_size // 2)
    code, err = run(tmp_path / "run")
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert "part-r0-000001.parquet does not match its checksum" in err and "--repair" in err
    code, err = run(tmp_path / "run", "--repair")
    assert code == 0 and "repair: set aside part-r0-000001.parquet" in err, err
    clean, repaired = (json.loads((tmp_path / d / "aggregates.json").read_text()) for d in ("clean", "run"))
    assert repaired["n_items"] == clean["n_items"] == 4
    for group, stats in clean["contextualization"].items():
        np.testing.assert_allclose(repaired["contextualization"][group]["mean"], stats["mean"], rtol=1e-9)


# ---------------------------------------------------------------- the activation store
def _items(directory: Path, n: int = 4) -> list[DatasetItem]:
    directory.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(random_images(n, seed=5)):
        image.save(directory / f"img-{i}.png")
    return [DatasetItem(f"item-{i}", directory / f"img-{i}.png", INSTRUCTIONS[i % 3]) for i in range(n)]


WRITE = dict(hooks=["blocks.1.hook_resid_post"], batch_size=2, progress=False)


@pytest.fixture(scope="module")
def activation_store(llava, tmp_path_factory) -> tuple[Path, list[DatasetItem]]:
    root = tmp_path_factory.mktemp("activations")
    items = _items(root / "images")
    ActivationStore.write(llava.vlm, items, root / "store", **WRITE)
    return root / "store", items


def test_every_byte_flip_in_a_shard_is_detected_on_open(activation_store, tmp_path):
    store, _ = activation_store
    flips = 0
    for name in ("data-b0000001.arrow", "data-b0000001.sha256"):
        for position in _positions(store / name, seed=1):
            copy = tmp_path / f"flip-{flips}"
            shutil.copytree(store, copy)
            _flip(copy / name, position)
            with pytest.raises(ActivationStoreError) as info:
                ActivationStore.open(copy)
            message = str(info.value)
            assert "data-b0000001" in message and "\n" not in message, message
            shutil.rmtree(copy)
            flips += 1
    assert flips == 2 * FLIPS_PER_FILE


def test_a_flipped_shard_is_refused_on_resume_and_repair_recomputes_it(llava, activation_store, tmp_path):
    store, items = activation_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    shard = copy / "data-b0000000.arrow"
    _flip(shard, shard.stat().st_size - 200)  # inside the last vectors
    with pytest.raises(
        ActivationStoreError, match=r"data-b0000000.arrow does not match its checksum.*--repair"
    ):
        ActivationStore.write(llava.vlm, items, copy, **WRITE)
    repaired = ActivationStore.write(llava.vlm, items, copy, repair=True, **WRITE)
    clean = ActivationStore.open(store)
    hook = WRITE["hooks"][0]
    assert repaired.verified and clean.verified
    np.testing.assert_array_equal(repaired[hook].numpy(), clean[hook].numpy())
    assert (copy / "quarantine" / "data-b0000000.arrow").exists()


def test_reading_without_verification_says_so(activation_store):
    store, _ = activation_store
    with pytest.warns(UserWarning, match="verify=False.*not checked"):
        unchecked = ActivationStore.open(store, verify=False)
    assert not unchecked.verified
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ActivationStore.open(store).verified


def test_a_store_of_an_earlier_version_without_checksums_is_read_and_reported(activation_store, tmp_path):
    store, _ = activation_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    for sidecar in copy.glob("*.sha256"):
        sidecar.unlink()
    with pytest.warns(UserWarning, match="2 shard.*no checksums.*not checked"):
        old = ActivationStore.open(copy)
    assert not old.verified and len(old) == len(ActivationStore.open(store))


def test_a_part_without_checksums_is_reported_not_counted_as_checked(results_store, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(results_store, copy)
    (copy / "items" / "part-r0-000002.sha256").unlink()
    with ResultStore(copy, settings=SETTINGS) as store:
        assert store.done_ids() == {"a", "b", "c", "d", "e"}
        assert [p.name for p in store.unchecksummed] == ["part-r0-000002.parquet"]
    assert "1 part(s)" in capsys.readouterr().err


def test_damage_is_a_hooked_vlm_error(results_store, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(results_store, copy)
    (copy / "items" / "part-r0-000000.sha256").write_text("not a checksum\n")
    with pytest.raises(HookedVLMError, match="part-r0-000000.sha256 is damaged"):
        ResultStore(copy, settings=SETTINGS).open()
