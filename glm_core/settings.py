"""Defaults that the environment can override, read in one place.

GLM_MODEL_PATH  model to load at start: "embedded" (default), a model folder or a .gguf file
GLM_PRECISION   auto | fp32 | bf16 | fp16 | int8 | int4
GLM_DEVICE      auto | cpu | cuda | cuda:N | mps
GLM_FAMILY      auto | chatglm2 | chatglm3 (overrides what a ChatGLM checkpoint folder suggests)
GLM_INT4_GROUP_SIZE input channels per INT4 scale and zero (default 32)
GLM_MODELS_MEMORY_MB memory budget of all local models loaded at once (the chat's Compare mode loads levels and
                models beside the main one): weights plus KV cache budgets; unset: what is free when one loads
GLM_KV_CACHE_MB memory budget of the kept per-conversation KV caches, and of the running batch's (default 2048)
GLM_MAX_BATCH   conversations decoded together (default: 16 on CPU, 64 on CUDA); more wait first-come-first-served
GLM_MAX_WAITING requests that may wait for a place in the batch (default 64); past it: "busy, try again"
GLM_MAX_WAITING_PER_OWNER requests one workspace or API key may have waiting (default 3)
GLM_MAX_RUNNING_PER_OWNER requests one workspace or API key may have running at once (default 1; raise it for keys
                that batch-process)
GLM_CACHE_DIR   where converted models (and compiled decode graphs, under inductor/) are kept (default ~/.cache/glm-dashboard)
GLM_COMPILE     auto | on | off: the compiled decode fast path (auto: on where it measured faster, see
                glm_core/engine/fast_decode.py)
GLM_CPU_KERNELS auto | off: our INT4, INT8 (output layer) and decode-attention CPU kernels where built and measured faster (models/cpu_kernels.py)
GLM_DATA_DIR    where conversations and benchmark runs are stored (default: data/ in the project folder, git-ignored)
GLM_MODEL_DIRS  folders (separated by the path separator, ":" on Linux) under which an admin may load a model
                from the pages; unset: any path
GLM_API_*       the HTTP API's keys and limits: read in glm_core/api/config.py
GLM_BACKENDS    several backends, `name=model-or-URL; ...` (see backends/config.py); remote keys: GLM_BACKEND_<NAME>_KEY,
                GLM_REMOTE_API_KEY; GLM_REMOTE_TIMEOUT_S bounds the wait for a server's next streamed chunk
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

EMBEDDED = "embedded"
DEFAULT_GROUP_SIZE = 32  # aligned with the 32-element blocks of GGUF Q4 files; 64 costs SmolLM2 +50 % perplexity
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    model_path: str
    precision: str
    device: str
    family: str
    group_size: int
    kv_cache_bytes: int
    max_batch: int | None
    max_waiting: int
    max_waiting_per_owner: int
    max_running_per_owner: int
    cache_dir: Path
    data_dir: Path
    model_dirs: tuple[Path, ...] = ()  # empty: the pages may load any path
    compile: str = "auto"
    models_memory_bytes: int | None = None  # GLM_MODELS_MEMORY_MB; None: the memory free at load time


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    cache_root = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    try:
        kv_mb = int(env.get("GLM_KV_CACHE_MB", "2048"))
    except ValueError as exc:
        raise ValueError(f"GLM_KV_CACHE_MB must be a whole number of MiB, got {env['GLM_KV_CACHE_MB']!r}") from exc
    max_batch = _positive_int(env, "GLM_MAX_BATCH")
    return Settings(
        model_path=env.get("GLM_MODEL_PATH") or EMBEDDED,
        precision=env.get("GLM_PRECISION") or "auto",
        device=env.get("GLM_DEVICE") or "auto",
        family=(env.get("GLM_FAMILY") or "auto").lower(),
        group_size=int(env.get("GLM_INT4_GROUP_SIZE") or DEFAULT_GROUP_SIZE),
        kv_cache_bytes=max(kv_mb, 0) * 2**20,
        max_batch=max_batch,
        max_waiting=_positive_int(env, "GLM_MAX_WAITING") or 64,
        max_waiting_per_owner=_positive_int(env, "GLM_MAX_WAITING_PER_OWNER") or 3,
        max_running_per_owner=_positive_int(env, "GLM_MAX_RUNNING_PER_OWNER") or 1,
        cache_dir=Path(env.get("GLM_CACHE_DIR") or Path(cache_root) / "glm-dashboard"),
        data_dir=Path(env.get("GLM_DATA_DIR") or PROJECT_ROOT / "data"),
        model_dirs=tuple(
            Path(p).expanduser() for p in (env.get("GLM_MODEL_DIRS") or "").split(os.pathsep) if p.strip()
        ),
        compile=_choice(env, "GLM_COMPILE", ("auto", "on", "off")),
        models_memory_bytes=(_positive_int(env, "GLM_MODELS_MEMORY_MB") or 0) * 2**20 or None,
    )


def _choice(env, name: str, choices: tuple[str, ...]) -> str:
    text = (env.get(name) or choices[0]).strip().lower()
    if text not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {env[name]!r}")
    return text


def _positive_int(env, name: str) -> int | None:
    text = env.get(name)
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {text!r}")
    return value
