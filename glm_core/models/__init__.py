"""Loading models (the embedded default, Hugging Face folders, GGUF files, ChatGLM checkpoints) at a precision."""

from .loading import LoadedModel, load_model
from .precision import Precision

__all__ = ["LoadedModel", "Precision", "load_model"]
