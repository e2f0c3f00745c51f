"""The one loaded model of a process, shared by every browser session (the page keeps it in st.cache_resource)."""

from __future__ import annotations

import gc
import threading

from ..engine import Engine
from ..models.loading import Progress, load_model, no_progress
from ..protocol import ModelLoadError, ModelSpec


class EngineHub:
    """Holds the current engine; loading another model replaces it only once the new one has loaded."""

    def __init__(self):
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self.last_error: str | None = None
        self.last_error_spec: ModelSpec | None = None

    @property
    def engine(self) -> Engine | None:
        return self._engine

    def load(self, spec: ModelSpec, progress: Progress | None = None, if_none_loaded: bool = False) -> Engine:
        """Return an engine for `spec`, loading it if needed. On failure the running model stays loaded.

        `if_none_loaded`: the automatic load of the default model; whatever model is loaded by the time the lock
        is ours stays (another session may have loaded one while this one waited)."""
        with self._lock:  # a second session asking meanwhile waits, then finds the model loaded
            current = self._engine
            if current is not None and (current.spec == spec or if_none_loaded):
                return current
            try:
                loaded = load_model(spec, progress or no_progress)
            except ModelLoadError as exc:
                self.last_error, self.last_error_spec = str(exc), spec
                raise
            self.last_error = self.last_error_spec = None
            if current is not None:
                self._shutdown(current)
            self._engine = Engine(loaded)
            return self._engine

    def unload(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._shutdown(self._engine)
                self._engine = None

    @staticmethod
    def _shutdown(engine: Engine) -> None:
        engine.close()
        engine.loaded.release()
        gc.collect()
