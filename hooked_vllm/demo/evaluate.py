"""Held-out accuracy of a trained demo model, per question kind and by number of shapes.

    python -m hooked_vllm.demo.evaluate [MODEL_DIR] [--n 400]

The numbers in ``MODEL_CARD.md`` come from this command (greedy next word, ``n`` questions per
kind, drawn from seeds never used in training).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoProcessor, LlavaForConditionalGeneration

from hooked_vllm.demo import MODEL_DIR, shapes
from hooked_vllm.demo.train import answer_hits

EVALUATION_SEED = shapes.HELD_OUT_SEED_BASE + 424_242


def evaluate(model_dir: Path, n: int = 400) -> dict[str, float]:
    """Accuracy per kind, and per kind restricted to one-shape and two-shape scenes."""
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    result: dict[str, float] = {}
    for offset, kind in enumerate(shapes.QUESTION_KINDS):
        examples = shapes.examples(seed=EVALUATION_SEED + offset, n=n, kinds=(kind,))
        hits = answer_hits(model, processor, examples)
        result[kind] = sum(hits) / len(hits)
        for count in (1, 2):
            subset = [hit for hit, ex in zip(hits, examples) if len(ex.scene) == count]
            if subset:
                result[f"{kind} ({count} shape{'s' * (count > 1)})"] = sum(subset) / len(subset)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path, nargs="?", default=MODEL_DIR)
    parser.add_argument("--n", type=int, default=400, help="questions per kind")
    args = parser.parse_args()
    print(json.dumps(evaluate(args.model_dir, args.n), indent=2))


if __name__ == "__main__":
    main()
