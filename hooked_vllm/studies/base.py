"""What every study is, and how one runs over a dataset on the run store.

A study is four things: its parameters (a dataclass of :mod:`hooked_vllm.studies.params`, the paper's
setting as defaults), a per-item function (:meth:`Study.item_rows`: a prepared batch in, one row of
plain values per item out), an aggregation (:meth:`Study.aggregate`: every row in, JSON-ready
aggregates out) and a report (:meth:`Study.write_report`: one self-contained HTML page).

:func:`run_study` runs it on a :class:`~hooked_vllm.runs.store.ResultStore`, as the phase-diagram run
does: one Parquet part per batch, written atomically and checksummed; the settings (model, data, the
study's parameters) stored with the results, so a resume with other settings is refused; one writer
per folder; a rerun resumes where the last stopped. Under torchrun (``RANK``/``WORLD_SIZE``) each rank
takes ``items[rank::world]`` and rank 0 aggregates once every rank is done.

Example:
    >>> from hooked_vllm.studies import KnockoutStudy, run_study  # doctest: +SKIP
    >>> result = run_study(KnockoutStudy(window=3), vlm, load_shapes("shapes/"), "out/")  # doctest: +SKIP
    >>> result.aggregates["edges"]["question->last"]["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from hooked_vllm.model.batch import PREPARE_ERRORS
from hooked_vllm.model.images import load_image
from hooked_vllm.runs.datasets import DatasetSample, bad_item, refused, screen_items
from hooked_vllm.runs.files import write_text_atomically
from hooked_vllm.runs.phase_diagram import json_ready, shard_of_environment
from hooked_vllm.runs.store import STUDY_KIND, ResultStore, RunStoreError
from hooked_vllm.studies.params import params_dict

#: a study's parts hold no summed vectors (the phase diagram's .npz holds its baseline sums)
NO_VECTORS: dict[str, np.ndarray] = {}


class Study:
    """One study: parameters, a per-item function, an aggregation and a report (see the module
    docstring). Subclasses set ``name``, ``params_type`` and ``paper`` and implement the three."""

    name: ClassVar[str]
    params_type: ClassVar[type]
    #: the paper the study reproduces (authors, title, arXiv id)
    paper: ClassVar[str]
    #: whether the per-item function takes gradients (else it runs under ``torch.inference_mode``)
    needs_grad: ClassVar[bool] = False

    def __init__(self, params: Any = None, **overrides: Any) -> None:
        params = self.params_type() if params is None else params
        self.params = replace(params, **overrides) if overrides else params

    def settings(self) -> dict[str, Any]:
        """What identifies the study's results besides the model and the data."""
        return {"study": self.name, **params_dict(self.params)}

    def plan(self, vlm, sample: DatasetSample) -> None:
        """Called once with the whole sample before any item runs, on every rank and resume (a study
        whose items need other items, e.g. attribution's pairs, finds them here). Default: nothing."""

    def answers(self, vlm, items: Sequence, clean: torch.Tensor) -> tuple[list[int], list[str]]:
        """Each item's answer token and where it came from: the dataset's label (``meta["answer"]``)
        where the study's ``answer`` parameter is ``"label"`` and the item has one, else the clean
        run's top token (``"prediction"``); ``clean`` is the last position's logits ``[batch, vocab]``."""
        tokens, sources = [], []
        for b, item in enumerate(items):
            label = (getattr(item, "meta", None) or {}).get("answer")
            if getattr(self.params, "answer", "prediction") == "label" and label:
                tokens.append(answer_token(vlm.tokenizer, str(label)))
                sources.append("label")
            else:
                tokens.append(int(clean[b].argmax()))
                sources.append("prediction")
        return tokens, sources

    def item_rows(self, vlm, items: Sequence, batch) -> list[dict]:
        """One row of plain values (numbers, strings, lists of numbers) per item of ``batch``."""
        raise NotImplementedError

    def aggregate(self, rows: list[dict]) -> dict:
        """JSON-ready aggregates of every item's row (sorted by item id)."""
        raise NotImplementedError

    def write_report(self, out_dir: Path, aggregates: dict, title: str) -> Path:
        """Write ``report.html`` (and the figures) into ``out_dir``; returns the report's path."""
        raise NotImplementedError


@dataclass
class StudyResult:
    out_dir: Path
    aggregates: dict
    n_items: int
    #: items found already done in the store when the run started
    n_resumed: int = 0
    rows: list[dict] = field(default_factory=list)
    #: seconds spent in the study's per-item function on this rank (this call's items only)
    seconds: float = 0.0


def default_settings(vlm, sample: DatasetSample) -> dict[str, Any]:
    """The model, its dtype and device, and the dataset: what identifies a run's inputs when the
    caller gives no settings (the study's own parameters are added by :func:`run_study`)."""
    first = next(vlm.hf_model.parameters())
    return {
        "model": getattr(vlm.hf_model.config, "_name_or_path", "") or type(vlm.hf_model).__name__,
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
        "dataset": sample.name,
        "n_items": len(sample.items),
    }


def open_study_store(
    out_dir: str | Path, rank: int, world_size: int, settings: Mapping[str, Any], *, repair: bool = False
) -> ResultStore:
    """Open (lock, check, verify) rank ``rank``'s store of study results; in a distributed run rank 0
    goes first and alone repairs, the others open once it has or raise the error it met."""

    def store(repair: bool) -> ResultStore:
        return ResultStore(out_dir, rank, settings, repair=repair, kind=STUDY_KIND, vector_keys=())

    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed:
        return store(repair).open()
    outcome: list[Any] = [None]
    opened = None
    if rank == 0:
        try:
            opened = store(repair).open()
        except RunStoreError as exc:
            outcome[0] = exc
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise outcome[0]
    return opened if opened is not None else store(False).open()


def _check_unique_ids(sample: DatasetSample) -> None:
    doubled = sorted(item_id for item_id, n in Counter(i.item_id for i in sample.items).items() if n > 1)
    if doubled:
        raise RunStoreError(
            f"The {sample.name} sample repeats item id(s) {', '.join(doubled[:5])}: each item must have "
            "its own id. Fix the dataset."
        )


def _prepared_batches(vlm, items: list, batch_size: int, sample: DatasetSample):
    """``(items, batch)`` per batch; an item whose image cannot be read or that the processor refuses
    is an error naming it, or, under ``sample.skip_bad``, skipped and listed in ``sample.skipped``."""
    for start in range(0, len(items), batch_size):
        pairs = []
        for item in items[start : start + batch_size]:
            try:
                pairs.append((item, load_image(item.image_path, max_pixels=sample.max_pixels)))
            except PREPARE_ERRORS as exc:
                sample.skipped.append(bad_item(sample, item, refused(exc)))
        if not pairs:
            continue
        try:
            batch = vlm.prepare([image for _, image in pairs], [item.instruction for item, _ in pairs])
        except PREPARE_ERRORS:  # find the items the processor refuses, alone; batch the others
            good = []
            for item, image in pairs:
                try:
                    vlm.prepare([image], [item.instruction])
                    good.append((item, image))
                except PREPARE_ERRORS as exc:
                    sample.skipped.append(bad_item(sample, item, refused(exc)))
            pairs = good
            batch = (
                vlm.prepare([image for _, image in pairs], [i.instruction for i, _ in pairs])
                if pairs
                else None
            )
        if batch is not None and pairs:
            yield [item for item, _ in pairs], batch


def run_study(
    study: Study,
    vlm,
    sample: DatasetSample,
    out_dir: str | Path | ResultStore,
    *,
    batch_size: int = 8,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    settings: Mapping[str, Any] | None = None,
    repair: bool = False,
) -> StudyResult | None:
    """Run ``study`` on every item of ``sample`` not yet in ``out_dir``, then aggregate (rank 0).

    Returns the aggregates on rank 0 (``None`` on other ranks); ``aggregates.json`` is written beside
    the parts. ``settings`` identify the inputs (default: :func:`default_settings`); the study's own
    parameters are always added. ``max_batches`` stops early (a later call resumes). ``out_dir`` may
    be an open store (the CLI opens it before loading the model).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RunStoreError(f"batch_size must be a positive integer; got {batch_size!r}.")
    _check_unique_ids(sample)
    screen_items(vlm, sample)
    study.plan(vlm, sample)
    env_rank, env_world = shard_of_environment()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if isinstance(out_dir, ResultStore):
        store, owned = out_dir, False
    else:
        full = {**(default_settings(vlm, sample) if settings is None else settings), **study.settings()}
        store, owned = open_study_store(out_dir, rank, world_size, full, repair=repair), True
    try:
        return _run(study, vlm, sample, store, batch_size, rank, world_size, progress, max_batches)
    finally:
        if owned:
            store.close()


def _run(
    study, vlm, sample, store, batch_size, rank, world_size, progress, max_batches
) -> StudyResult | None:
    done = store.done_ids()
    mine = [item for item in sample.items[rank::world_size] if item.item_id not in done]
    n_resumed = sum(item.item_id in done for item in sample.items)
    if n_resumed and progress:
        print(
            f"resuming {store.out_dir}: {n_resumed} of {len(sample.items)} items already done",
            file=sys.stderr,
        )
    bar = tqdm(total=len(mine), disable=not progress, desc=f"rank {rank}" if world_size > 1 else study.name)
    seconds = 0.0
    with torch.enable_grad() if study.needs_grad else torch.inference_mode():
        for n_batch, (items, batch) in enumerate(_prepared_batches(vlm, mine, batch_size, sample)):
            if max_batches is not None and n_batch >= max_batches:
                break
            began = time.perf_counter()
            rows = study.item_rows(vlm, items, batch)
            seconds += time.perf_counter() - began
            store.write([{"item_id": item.item_id, **row} for item, row in zip(items, rows)], NO_VECTORS)
            bar.update(len(items))
    bar.close()
    if world_size > 1 and rank != 0:  # rank 0 lists every rank's skipped items
        write_text_atomically(store.dir / f"skipped-r{rank}.json", json.dumps(sample.skipped))
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return None
    for other in range(1, world_size):
        listed = store.dir / f"skipped-r{other}.json"
        if listed.is_file():
            sample.skipped.extend(tuple(entry) for entry in json.loads(listed.read_text()))
    rows, _ = store.read()
    if not rows:
        raise RunStoreError(f"{store.out_dir} holds no results: no item was run.")
    aggregates = {**study.aggregate(rows), "skipped": [list(entry) for entry in sample.skipped]}
    write_text_atomically(store.out_dir / "aggregates.json", json.dumps(json_ready(aggregates), indent=1))
    return StudyResult(store.out_dir, aggregates, len(rows), n_resumed, rows, seconds)


# ---------------------------------------------------------------- shared by the studies
def answer_token(tokenizer, answer: str) -> int:
    """The first token of ``answer`` as the model writes it after a prompt (after a space): the token
    whose probability a study follows."""
    if (exact := tokenizer.convert_tokens_to_ids(answer)) not in (None, tokenizer.unk_token_id):
        return int(exact)  # a word of the vocabulary (the demo's word-level tokenizer)
    ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    words = [i for i in ids if tokenizer.decode([i]).strip()]  # a bare leading space piece skipped
    if not words:
        raise ValueError(f"The answer {answer!r} encodes to no token.")
    return int(words[0])


def stats(matrix: np.ndarray) -> dict[str, list]:
    """Per column: the mean, standard deviation and normal 95% interval half-width over the rows where
    the value is defined (``n``); NaN where fewer than one (mean) or two (std, interval) rows are."""
    matrix = np.asarray(matrix, dtype=float).reshape(len(matrix), -1)
    n = np.sum(~np.isnan(matrix), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.nansum(matrix, axis=0)
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        centred = np.where(np.isnan(matrix), 0.0, matrix - mean)
        std = np.where(n > 1, np.sqrt((centred**2).sum(0) / np.maximum(n - 1, 1)), np.nan)
    ci = 1.96 * std / np.sqrt(np.maximum(n, 1))
    return {"mean": mean.tolist(), "std": std.tolist(), "ci95": ci.tolist(), "n": n.tolist()}
