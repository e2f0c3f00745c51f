"""GLM Chat Dashboard core: backends (the local engine, remote servers), models, conversations, benchmarks.

Never imports streamlit. Importing this package (and the conversation layer) does not import torch: the shared
types come from `protocol`; the engine and the model loader are imported from their subpackages.
"""

from .protocol import (
    Backend,
    Capabilities,
    ConversationBusy,
    Delta,
    EngineClosed,
    Finished,
    LoadReport,
    MemoryReport,
    ModelCard,
    ModelLoadError,
    ModelSpec,
    PromptTooLong,
    Queued,
    QueueFull,
    Reply,
    ReplyStats,
    Request,
    SamplingParams,
    Started,
    Truncated,
)
from .settings import EMBEDDED, load_settings

__all__ = [
    "Backend",
    "Capabilities",
    "ConversationBusy",
    "Delta",
    "EMBEDDED",
    "EngineClosed",
    "Finished",
    "LoadReport",
    "MemoryReport",
    "ModelCard",
    "ModelLoadError",
    "ModelSpec",
    "PromptTooLong",
    "QueueFull",
    "Queued",
    "Reply",
    "ReplyStats",
    "Request",
    "SamplingParams",
    "Started",
    "Truncated",
    "load_settings",
]
