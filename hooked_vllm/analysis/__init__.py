"""The paper's three lenses as pure tensor functions, a one-pass collector, and phase detection."""

from hooked_vllm.analysis.attention_lenses import attention_group_sums
from hooked_vllm.analysis.collect import ANALYSES, AttentionSummary, BatchAnalysis, collect, reduce_cache
from hooked_vllm.analysis.contextualization import (
    ContextualizationSums,
    contextualization_from_cache,
    cross_input_baseline,
    pair_mean_cosine,
)
from hooked_vllm.analysis.logit_lens import (
    LensResult,
    LogitLens,
    lens_stack_from_cache,
    resid_stack_from_cache,
    verbalize,
)
from hooked_vllm.analysis.norm_attention import (
    block_mean,
    head_gram,
    head_norms,
    head_summed_norms,
    modality_pairs,
    saliency_received,
    transformed_values,
)
from hooked_vllm.analysis.phases import PhaseReport, detect_phases
from hooked_vllm.model.observed_attention import observed_sdpa_attention

__all__ = [
    "ANALYSES",
    "AttentionSummary",
    "BatchAnalysis",
    "ContextualizationSums",
    "LensResult",
    "LogitLens",
    "PhaseReport",
    "attention_group_sums",
    "block_mean",
    "collect",
    "contextualization_from_cache",
    "cross_input_baseline",
    "detect_phases",
    "head_gram",
    "head_norms",
    "head_summed_norms",
    "modality_pairs",
    "observed_sdpa_attention",
    "pair_mean_cosine",
    "reduce_cache",
    "lens_stack_from_cache",
    "resid_stack_from_cache",
    "saliency_received",
    "transformed_values",
    "verbalize",
]
