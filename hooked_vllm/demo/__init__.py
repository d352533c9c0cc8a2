"""The demo VLM shipped with the package: a toy LLaVA trained on synthetic shapes (see MODEL_CARD.md)."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"


def demo_model_dir() -> Path:
    """Directory of the shipped demo model (``HookedVLM.from_pretrained(str(demo_model_dir()))``)."""
    if not (MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"The demo model is missing from {MODEL_DIR}. Reinstall hooked-vllm, or retrain it with "
            "`python -m hooked_vllm.demo.train`."
        )
    return MODEL_DIR
