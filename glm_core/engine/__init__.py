"""The local backend: a scheduler that admits requests and a runner that decodes them, over one loaded model."""

from .scheduler import Engine

__all__ = ["Engine"]
