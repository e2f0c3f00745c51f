"""The backends of a process, shared by every browser session (the page keeps the hub in st.cache_resource).

One slot holds the local model (an Engine; or a remote backend when a URL is loaded there, as the CLI's
`--model http://...` does); any number of named remote backends sit beside it. Each conversation names the backend it
talks to (see config.conversation_backend).

More local models may be loaded beside the main one (the chat's Compare mode: other levels of the loaded model,
other models), within GLM_MODELS_MEMORY_MB: each local engine is charged its weights and its KV cache budgets (the
kept caches and the running batch's), a model not yet loaded the estimator's prediction of the same, and one that
would not fit is refused with the figures. All local engines take turns on the device (engine/device_turns.py).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..engine.device_turns import DeviceTurns
from ..protocol import Backend, ModelLoadError, ModelSpec
from ..settings import load_settings
from .config import DEFAULT_LOCAL_NAME, BackendEntry
from .remote import RemoteBackend, is_remote

if TYPE_CHECKING:
    from ..models.loading import Progress

BESIDE_KV_BYTES = 256 * 2**20  # KV cache budget of a model loaded beside the main one: compare replies are one turn


class ModelDoesNotFit(ModelLoadError):
    """Loading this model beside the others would exceed the memory budget; the message gives the figures."""


class BackendHub:
    """Holds the local slot and the remote backends; loading another local model replaces the slot's only once the
    new one has loaded."""

    def __init__(
        self,
        entries: list[BackendEntry] | None = None,
        predict_weights: Callable[[ModelSpec], int] | None = None,
    ):
        """`predict_weights`: the weights bytes of a spec before loading it (bench.estimator.spec_weights_bytes);
        without it no model is loaded beside the main one."""
        self._lock = threading.Lock()
        self.predict_weights = predict_weights
        self._engine: Backend | None = None
        self._remotes: dict[str, RemoteBackend] = {}
        self.local_name = DEFAULT_LOCAL_NAME
        self.local_spec: ModelSpec | None = None  # what the local slot loads on first use; None: no local entry
        self.last_error: str | None = None
        self.last_error_spec: ModelSpec | None = None
        self.configured = False
        self._configured_keys: dict[str, str | None] = {}  # configured remote URL -> its key
        self.config_error: str | None = None  # why the configured backends were not used (shown by the portal)
        self.turns = DeviceTurns()  # every local engine of this hub steps in turn
        self._beside: dict[str, Backend] = {}  # local models loaded beside the main one, by label
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
        for label in list(self._beside):
            self.unload_beside(label)
        for name in list(self._remotes):
            self.remove(name)

    def _load_local(self, spec: ModelSpec, progress, kv_cache_bytes: int | None = None):
        from ..engine import Engine
        from ..models.loading import load_model, no_progress

        return Engine(load_model(spec, progress or no_progress), kv_cache_bytes=kv_cache_bytes, turns=self.turns)

    # ---- local models beside the main one ------------------------------------------------------------------

    def beside(self) -> dict[str, Backend]:
        """The local models loaded beside the main one, by label ("SmolLM2-135M-Instruct INT4")."""
        return dict(self._beside)

    def local_models(self) -> dict[str, Backend]:
        """Every local model of this hub: the main slot's (under its backend name) and those beside it."""
        main = {self.local_name: self._engine} if getattr(self._engine, "loaded", None) is not None else {}
        return {**main, **self._beside}

    def load_beside(self, spec: ModelSpec, progress: Progress | None = None) -> tuple[str, Backend]:
        """(label, backend) of a local model for `spec` next to the others: the main one or one beside it when
        either already is `spec`, else a new one, loaded only if its predicted memory fits the budget (raises
        ModelDoesNotFit saying why, ModelLoadError when it cannot load)."""
        with self._lock:
            for label, backend in self.local_models().items():
                if backend.spec == spec:
                    return label, backend
            kv_bytes = min(BESIDE_KV_BYTES, load_settings().kv_cache_bytes)
            self._check_fits(spec, kv_bytes)
            try:
                backend = self._load_local(spec, progress, kv_cache_bytes=kv_bytes)
            except ValueError as exc:
                raise ModelLoadError(str(exc)) from exc
            label = backend.turn_name
            if label in self._beside:  # the same model and level with another group size or device
                label += f" ({spec.device}, g{spec.group_size})"
            self._beside[label] = backend
            return label, backend

    def unload_beside(self, label: str) -> None:
        with self._lock:
            backend = self._beside.pop(label, None)
        if backend is not None:
            self._shutdown(backend)

    def memory_plan(self) -> dict:
        """What the local models are charged against the budget: {"budget_bytes" (None: none set),
        "free_bytes" (memory free now), "models": [{"name", "weights_bytes", "kv_budget_bytes", "bytes"}]}."""
        from ..models.precision import resolve_device
        from ..telemetry.memory import free_memory_bytes

        settings = load_settings()
        models = [
            {"name": label, **_charge(backend.loaded.weights["total"], backend.pool.budget_bytes)}
            for label, backend in self.local_models().items()
        ]
        return {
            "budget_bytes": settings.models_memory_bytes,
            "free_bytes": free_memory_bytes(resolve_device(settings.device)),
            "models": models,
        }

    def _check_fits(self, spec: ModelSpec, kv_bytes: int) -> None:
        """Called with the lock held."""
        if self.predict_weights is None:
            raise ModelDoesNotFit("no memory estimator is configured here, so no model is loaded beside the others")
        try:
            weights = self.predict_weights(spec)
        except ValueError as exc:
            raise ModelDoesNotFit(
                f"{spec.path}: its memory cannot be predicted, so it is not loaded beside: {exc}"
            ) from exc
        need = _charge(weights, kv_bytes)
        plan = self.memory_plan()
        taken = sum(m["bytes"] for m in plan["models"])
        what = (
            f"{spec.path} {spec.precision.upper()} needs about {_gb(need['bytes'])} (weights {_gb(need['weights_bytes'])}"
            f" + KV caches {_gb(need['kv_budget_bytes'])})"
        )
        held = ", ".join(f"{m['name']} {_gb(m['bytes'])}" for m in plan["models"]) or "nothing"
        if plan["budget_bytes"] is not None and taken + need["bytes"] > plan["budget_bytes"]:
            raise ModelDoesNotFit(
                f"{what}, but GLM_MODELS_MEMORY_MB allows {_gb(plan['budget_bytes'])} for all local models and "
                f"{_gb(taken)} is taken ({held}); unload one first"
            )
        if need["bytes"] > plan["free_bytes"]:
            raise ModelDoesNotFit(f"{what}, but only {_gb(plan['free_bytes'])} is free now ({held} loaded)")

    @staticmethod
    def _shutdown(engine: Backend) -> None:
        engine.close()
        loaded = getattr(engine, "loaded", None)  # a local engine's weights are the hub's to free
        if loaded is not None:
            loaded.release()
        gc.collect()


def _charge(weights: int, kv_budget: int) -> dict:
    """An engine's charge: its weights and its KV budgets (the kept caches' and the running batch's, see Engine)."""
    kv = kv_budget + max(kv_budget, 2**26)
    return {"weights_bytes": weights, "kv_budget_bytes": kv, "bytes": weights + kv}


def _gb(value: int) -> str:
    return f"{value / 1e9:.2f} GB"


def _remote(spec: ModelSpec) -> ModelSpec:
    from .remote import remote_spec

    return remote_spec(spec.path)
