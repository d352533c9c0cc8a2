"""The activation store: takes a hooked model, a dataset and hook names, gives one row per (item,
position) on disk as Hugging Face ``datasets`` Arrow shards, for probes and SAEs.

``layout`` says which rows an item gives (positions, modality, image grid cell), ``shards`` writes and
verifies the Arrow files, ``run`` drives the model over the dataset (resumable, locked, data parallel,
the disk budget checked first), and ``store`` opens the result
(:class:`~hooked_vllm.activations.store.ActivationStore`, also ``hooked_vllm.ActivationStore``).
``constants`` holds the choices the command line offers, importable without torch.
"""
