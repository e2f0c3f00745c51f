"""HTTP API over a Backend: the seeds' routes and OpenAI-compatible ones (FastAPI; see app.py)."""

from .app import create_app
from .config import ApiConfig, load_api_config

__all__ = ["ApiConfig", "create_app", "load_api_config"]
