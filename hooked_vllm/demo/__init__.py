"""The demo VLMs shipped with the package, toy LLaVAs trained on synthetic shapes:

- ``demo`` (``model/``): 6 layers, trained on the task alone (see ``model/MODEL_CARD.md``);
- ``demo-phases`` (``phases/``): 16 layers, built as real VLMs are, text pretraining, then alignment,
  then instruction tuning: the main job's default (see ``phases/MODEL_CARD.md``).
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
PHASES_MODEL_DIR = Path(__file__).parent / "phases"


def _shipped(directory: Path, retrain: str) -> Path:
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"The demo model is missing from {directory}. Reinstall hooked-vllm, or retrain it with "
            f"`python -m {retrain}`."
        )
    return directory


def demo_model_dir() -> Path:
    """Directory of the shipped demo model (``HookedVLM.from_pretrained(str(demo_model_dir()))``)."""
    return _shipped(MODEL_DIR, "hooked_vllm.demo.train")


def demo_phases_model_dir() -> Path:
    """Directory of the shipped 16-layer demo model trained in three stages (``"demo-phases"``)."""
    return _shipped(PHASES_MODEL_DIR, "hooked_vllm.demo.train_phases")
