"""Errors raised by hooked-vllm. Each says what was expected, what came, and what to do."""


class HookedVLMError(ValueError):
    """Base class of every error hooked-vllm raises on bad input."""


class UnsupportedModelError(HookedVLMError):
    """The model's architecture has no adapter."""


class ImageCountError(HookedVLMError):
    """Images and image placeholders in the prompts do not match."""


class MissingImageError(HookedVLMError):
    """A batch has image placeholders but no pixel values, or the reverse."""


class SequenceTooLongError(HookedVLMError):
    """A sequence exceeds the language model's context length."""


class ImageLoadError(HookedVLMError):
    """An image file could not be read or decoded."""


class BatchFormatError(HookedVLMError):
    """A batch lacks a field or has one of the wrong shape."""


class CheckpointError(HookedVLMError):
    """A checkpoint's tensors do not match the model: missing, unexpected or of the wrong shape."""


class GenerationArgumentError(HookedVLMError):
    """``generate`` was given settings it cannot honour (e.g. a negative length, temperature 0)."""


class ModelNotFoundError(HookedVLMError):
    """A model source that is neither a checkpoint folder nor reachable: no such folder, a folder
    without a checkpoint, or a hub id that is not in the local cache while the hub cannot be reached."""


class ReturnTypeError(HookedVLMError):
    """A ``return_type`` the call does not know (``forward``: 'logits', 'loss', 'both', None)."""


class LayerError(HookedVLMError):
    """A layer number the model does not have (layer numbers are TransformerLens's block indices)."""


class HookOutputError(HookedVLMError):
    """A hook function returned something other than None or a tensor of its activation's shape and
    dtype."""
