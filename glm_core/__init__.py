"""GLM Chat Dashboard core: model loading, the chat engine, benchmarks. Never imports streamlit."""

from .engine import (
    ConversationBusy,
    EngineClosed,
    Delta,
    Engine,
    Finished,
    PromptTooLong,
    Queued,
    Reply,
    ReplyStats,
    Request,
    Started,
    Truncated,
)
from .loading import LoadedModel, ModelLoadError, ModelSpec, load_model
from .precision import Precision
from .sampling import SamplingParams
from .settings import EMBEDDED, load_settings

__all__ = [
    "ConversationBusy", "Delta", "EngineClosed", "EMBEDDED", "Engine", "Finished", "LoadedModel", "ModelLoadError", "ModelSpec",
    "Precision", "PromptTooLong", "Queued", "Reply", "ReplyStats", "Request", "SamplingParams", "Started",
    "Truncated", "load_model", "load_settings",
]
