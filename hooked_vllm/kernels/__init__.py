"""Fused GPU kernels (Triton), each with a PyTorch twin elsewhere in the package that gives the same
results; callers choose automatically (:func:`hooked_vllm.analysis.attention_lenses.attention_group_sums`)."""
