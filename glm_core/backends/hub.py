"""The backends of a process, shared by every browser session (the page keeps the hub in st.cache_resource).

One slot holds the local model (an Engine; or a remote backend when a URL is loaded there, as the CLI's
`--model http://...` does); any number of named remote backends sit beside it. Each conversation names the backend it
talks to (see config.conversation_backend).
"""

from __future__ import annotations

import gc
import threading
from typing import TYPE_CHECKING

from ..protocol import Backend, ModelLoadError, ModelSpec
from .config import DEFAULT_LOCAL_NAME, BackendEntry
from .remote import RemoteBackend, is_remote

if TYPE_CHECKING:
    from ..models.loading import Progress


class EngineHub:
    """Holds the local slot and the remote backends; loading another local model replaces the slot's only once the
    new one has loaded."""

    def __init__(self, entries: list[BackendEntry] | None = None):
        self._lock = threading.Lock()
        self._engine: Backend | None = None
        self._remotes: dict[str, RemoteBackend] = {}
        self.local_name = DEFAULT_LOCAL_NAME
        self.local_spec: ModelSpec | None = None  # what the local slot loads on first use; None: no local entry
        self.last_error: str | None = None
        self.last_error_spec: ModelSpec | None = None
        self.configured = False
        self._configured_keys: dict[str, str | None] = {}  # configured remote URL -> its key
        self.config_error: str | None = None  # why the configured backends were not used (shown by the portal)
        if entries is not None:
            self.configure(entries)

    def configure(self, entries: list[BackendEntry]) -> None:
        """Set the offered backends (once per process; later calls change nothing)."""
        with self._lock:
            if self.configured:
                return
            self.configured = True
            for entry in entries:
                if entry.remote:
                    self._configured_keys[entry.spec.path] = entry.api_key
                    self._remotes[entry.name] = RemoteBackend(entry.spec, api_key=entry.api_key, name=entry.name)
                else:
                    self.local_name, self.local_spec = entry.name, entry.spec
                    self._local_follows_settings = entry.from_settings
            self._order = [e.name for e in entries]

    # ---- what is offered -----------------------------------------------------------------------------------

    @property
    def engine(self) -> Backend | None:
        """The local slot's backend (None until loaded)."""
        return self._engine

    def names(self) -> list[str]:
        """Offered backend names, the default first."""
        order = [n for n in getattr(self, "_order", []) if n in self._remotes or n == self.local_name]
        order += [n for n in self._remotes if n not in order]
        if (self._engine is not None or self.local_spec is not None) and self.local_name not in order:
            order.insert(0, self.local_name)
        return order

    @property
    def default_name(self) -> str | None:
        names = self.names()
        return names[0] if names else None

    def get(self, name: str | None) -> Backend | None:
        """The backend of that name (the local slot's may not be loaded yet: None)."""
        if name == self.local_name:
            return self._engine
        return self._remotes.get(name) if name else None

    def default_local_spec(self) -> ModelSpec:
        """What the local slot loads on first use: the configured local entry, else the settings as they are now."""
        if self.local_spec is None or getattr(self, "_local_follows_settings", False):
            return ModelSpec.from_settings()
        return self.local_spec

    def is_local(self, name: str | None) -> bool:
        return name == self.local_name

    def add_remote(self, entry: BackendEntry) -> RemoteBackend:
        """Offer one more remote backend (admin only in the UI). Raises ValueError for a name in use."""
        if not entry.remote:
            raise ValueError("only remote servers can be added beside the local model")
        with self._lock:
            if entry.name in self._remotes or entry.name == self.local_name:
                raise ValueError(f"a backend named {entry.name!r} exists already")
            backend = RemoteBackend(entry.spec, api_key=entry.api_key, name=entry.name)
            self._remotes[entry.name] = backend
            return backend

    def remove(self, name: str) -> None:
        """Stop offering a remote backend (its running replies end, marked stopped)."""
        with self._lock:
            backend = self._remotes.pop(name, None)
        if backend is not None:
            backend.close()

    # ---- the local slot ------------------------------------------------------------------------------------

    def load(self, spec: ModelSpec, progress: Progress | None = None, if_none_loaded: bool = False) -> Backend:
        """Return a backend for `spec` in the local slot, loading it if needed (a URL spec makes a remote backend
        there). On failure the running model stays loaded.

        `if_none_loaded`: the automatic load of the default model; whatever model is loaded by the time the lock
        is ours stays (another session may have loaded one while this one waited)."""
        with self._lock:  # a second session asking meanwhile waits, then finds the model loaded
            current = self._engine
            remote = is_remote(spec.path)
            if current is not None and (
                if_none_loaded or current.spec == spec or remote and current.spec == _remote(spec)
            ):
                return current
            try:
                # A URL gets a key only when it is a configured backend's own URL (never for a typed one).
                backend = (
                    RemoteBackend(spec, api_key=self._configured_keys.get(spec.path))
                    if remote
                    else self._load_local(spec, progress)
                )
            except (ModelLoadError, ValueError) as exc:
                self.last_error, self.last_error_spec = str(exc), spec
                if isinstance(exc, ModelLoadError):
                    raise
                raise ModelLoadError(str(exc)) from exc
            self.last_error = self.last_error_spec = None
            if current is not None:
                self._shutdown(current)
            self._engine = backend
            return backend

    def unload(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._shutdown(self._engine)
                self._engine = None

    def close(self) -> None:
        self.unload()
        for name in list(self._remotes):
            self.remove(name)

    @staticmethod
    def _load_local(spec: ModelSpec, progress):
        from ..engine import Engine
        from ..models.loading import load_model, no_progress

        return Engine(load_model(spec, progress or no_progress))

    @staticmethod
    def _shutdown(engine: Backend) -> None:
        engine.close()
        loaded = getattr(engine, "loaded", None)  # a local engine's weights are the hub's to free
        if loaded is not None:
            loaded.release()
        gc.collect()


def _remote(spec: ModelSpec) -> ModelSpec:
    from .remote import remote_spec

    return remote_spec(spec.path)
