"""Locating the four phases from per-layer curves.

Input: per-layer (layer 0 = embedding) intra-image, intra-text and inter-modal contextualization,
and optionally the logit lens's KL to the final distribution. Curves are smoothed with a centred
moving average (``window``); a change counts only if it exceeds ``min_effect`` times the curve's
range, so noise does not create boundaries. The rules:

- **I Alignment** ``[0, a)``: inter rises from the embedding to its first local peak ``a`` within the
  first half of the network.
- **II Intra-modal encoding** ``[a, b)``: from ``a`` to the inter curve's minimum ``b`` before the
  late peak, while intra-modal contextualization (mean of intra-image and intra-text) stays above
  inter and rises or holds.
- **III Inter-modal encoding** ``[b, c)``: inter rises from ``b`` to its late peak ``c``.
- **IV Output preparation** ``[c, L]``: all three curves fall from ``c`` to the last layer, and, when
  the logit lens is given, its KL to the final distribution falls below ``kl_converged`` only here.

A phase whose rule fails is reported as absent with the reason; nothing is invented.

Example:
    >>> import numpy as np
    >>> inter = np.array([.1, .3, .2, .15, .2, .3, .4, .5, .3, .2])
    >>> intra = np.array([.2, .4, .5, .6, .6, .6, .6, .6, .4, .3])
    >>> report = detect_phases(intra, intra, inter, window=1)
    >>> [(p.name, p.start, p.end) for p in report.phases if p.found]  # doctest: +NORMALIZE_WHITESPACE
    [('alignment', 0, 1), ('intra-modal encoding', 1, 3), ('inter-modal encoding', 3, 7),
     ('output preparation', 7, 9)]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PHASE_NAMES = ("alignment", "intra-modal encoding", "inter-modal encoding", "output preparation")
#: Each phase's rule in a sentence (the module docstring has them in full), for reports.
PHASE_RULES = {
    "alignment": "inter-modal contextualization rises from the embedding to a first peak within the "
    "first half of the network",
    "intra-modal encoding": "after that peak, inter-modal contextualization falls to a minimum while the "
    "intra-modal curves stay above it and hold",
    "inter-modal encoding": "inter-modal contextualization rises again, from that minimum to its late peak",
    "output preparation": "all three curves fall from the late peak to the last layer (and the logit "
    "lens settles on the final answer only there)",
}


@dataclass
class Phase:
    name: str
    start: int | None
    end: int | None
    found: bool
    evidence: str


@dataclass
class PhaseReport:
    phases: list[Phase] = field(default_factory=list)

    @property
    def clear(self) -> bool:
        return all(phase.found for phase in self.phases)

    def summary(self) -> str:
        lines = []
        for phase in self.phases:
            span = f"layers {phase.start}-{phase.end}" if phase.found else "not found"
            lines.append(f"{phase.name:22s} {span:14s} {phase.evidence}")
        return "\n".join(lines)


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; the ends average over what is available."""
    if window <= 1:
        return curve.astype(float)
    kernel = np.ones(window)
    padded_sum = np.convolve(curve, kernel, mode="same")
    counts = np.convolve(np.ones_like(curve, dtype=float), kernel, mode="same")
    return padded_sum / counts


def detect_phases(
    intra_image: np.ndarray,
    intra_text: np.ndarray,
    inter: np.ndarray,
    kl_to_final: np.ndarray | None = None,
    *,
    window: int = 3,
    min_effect: float = 0.1,
    kl_converged: float = 1.0,
) -> PhaseReport:
    """Locate the four phases (see the module docstring for the rules)."""
    intra_image, intra_text, inter = (np.asarray(c, dtype=float) for c in (intra_image, intra_text, inter))
    n = len(inter)
    curves = [intra_image, intra_text, inter]
    if kl_to_final is not None:
        curves.append(np.asarray(kl_to_final, dtype=float))
    not_finite = sorted({int(i) for curve in curves for i in np.nonzero(~np.isfinite(curve))[0]})
    if n < 4 or not_finite:
        reason = (
            f"not located: the curves are NaN or inf at layer(s) {', '.join(map(str, not_finite[:8]))}"
            if not_finite
            else "need at least 4 layers of finite curves"
        )
        return PhaseReport([Phase(name, None, None, False, reason) for name in PHASE_NAMES])
    intra = (intra_image + intra_text) / 2
    inter_s, intra_s = smooth(inter, window), smooth(intra, window)
    everything = smooth((intra_image + intra_text + inter) / 3, window)
    threshold = min_effect * max(np.ptp(inter_s), np.ptp(intra_s), 1e-12)
    phases: list[Phase] = []

    # I: first local peak of inter in the first half, clearly above the embedding.
    half = max(2, n // 2)
    a = next(
        (i for i in range(1, half) if inter_s[i] >= inter_s[i - 1] and inter_s[i] > inter_s[i + 1]), None
    )
    if a is not None and inter_s[a] - inter_s[0] > threshold:
        phases.append(
            Phase(
                PHASE_NAMES[0], 0, a, True, f"inter rises {inter_s[0]:.3f} -> {inter_s[a]:.3f} by layer {a}"
            )
        )
    else:
        phases.append(
            Phase(PHASE_NAMES[0], None, None, False, "no early rise of inter-modal contextualization")
        )
        a = None

    # III's end c: the late peak of inter (after the early peak), followed by a global drop.
    search_from = (a or 0) + 1
    c = search_from + int(np.argmax(inter_s[search_from:])) if search_from < n else None
    # II: from a to the minimum of inter between a and c.
    b = None
    if a is not None and c is not None and c - a >= 2:
        b = a + int(np.argmin(inter_s[a : c + 1]))
        dip = inter_s[a] - inter_s[b]
        intra_above = bool((intra_s[a : b + 1] > inter_s[a : b + 1]).all())
        intra_holds = intra_s[b] >= intra_s[a] - threshold
        if b > a and dip > threshold and intra_above and intra_holds:
            phases.append(
                Phase(
                    PHASE_NAMES[1],
                    a,
                    b,
                    True,
                    f"inter falls {inter_s[a]:.3f} -> {inter_s[b]:.3f} while intra holds "
                    f"{intra_s[a]:.3f} -> {intra_s[b]:.3f}",
                )
            )
        else:
            phases.append(
                Phase(
                    PHASE_NAMES[1],
                    None,
                    None,
                    False,
                    "inter is not suppressed while intra holds after alignment",
                )
            )
            b = None
    else:
        phases.append(Phase(PHASE_NAMES[1], None, None, False, "no alignment peak to start from"))

    # III: inter rises from b to c.
    if b is not None and c is not None and c > b and inter_s[c] - inter_s[b] > threshold:
        phases.append(Phase(PHASE_NAMES[2], b, c, True, f"inter rises {inter_s[b]:.3f} -> {inter_s[c]:.3f}"))
    else:
        phases.append(
            Phase(PHASE_NAMES[2], None, None, False, "no late rise of inter-modal contextualization")
        )

    # IV: global drop after c, and the logit lens converging there.
    if c is not None and c < n - 1 and everything[c] - everything[-1] > threshold:
        evidence = f"mean contextualization falls {everything[c]:.3f} -> {everything[-1]:.3f}"
        ok = True
        if kl_to_final is not None:
            kl = np.asarray(kl_to_final, dtype=float)
            converged = np.nonzero(kl <= kl_converged)[0]
            first = int(converged[0]) if len(converged) else None
            ok = first is not None and first >= c - 1
            evidence += f"; logit lens KL <= {kl_converged} from layer {first}"
        phases.append(
            Phase(PHASE_NAMES[3], c, n - 1, ok, evidence if ok else evidence + " (before the drop)")
        )
    else:
        phases.append(
            Phase(PHASE_NAMES[3], None, None, False, "no global drop of contextualization at the end")
        )
    return PhaseReport(phases)
