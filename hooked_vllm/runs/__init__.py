"""Runs over datasets: takes a hooked model and a dataset, gives per-item results on disk and their
aggregates.

The dataset readers (``datasets``: COCO, Winoground, image folders, the shipped photos;
``shapes_dataset``: the demo's synthetic shapes) yield items; ``phase_diagram`` batches them through
the one-pass collector of :mod:`hooked_vllm.analysis` into the results store (``store``: atomic parts,
the settings kept with them, a lock per folder, verification and repair), resumes interrupted runs,
and aggregates the curves and phases that :mod:`hooked_vllm.report` draws.
"""
