"""What a memory benchmark is asked: the request, and what its source (a preset, a config.json, a model folder,
the embedded model) is."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ...models.precision import Precision, resolve_device
from ...settings import DEFAULT_GROUP_SIZE, EMBEDDED, load_settings
from ..estimator import PRESETS, ConfigError, read_config

DECODE_STEPS = 16
LEVELS = [p.value for p in Precision]
# A level that runs longer is killed and reported (a 6B model at 8192 tokens takes minutes per level on a CPU).
LEVEL_TIME_LIMIT_S = 30 * 60


@dataclass(frozen=True)
class MemoryBenchRequest:
    """A run over `levels`; each level's child gets the same request with that one level."""

    source: str  # a preset name, a config.json (random weights), a model folder or "embedded" (real weights)
    levels: tuple[str, ...] = ("fp16", "int8", "int4")
    encode: int = 2048
    generate: int = 8192
    device: str = "auto"
    group_size: int = DEFAULT_GROUP_SIZE
    eval_tokens: int = 512
    check_memory: bool = True  # refuse a level whose predicted peak exceeds the free memory
    time_limit_s: float = LEVEL_TIME_LIMIT_S  # per level: past it the level's process is killed

    def describe(self) -> dict:
        return asdict(self)


def source_kind(source: str) -> str:
    """ "random" (preset or config.json: random weights) or "real" (a model folder or the embedded model)."""
    if source.strip().lower() in PRESETS:
        return "random"
    if source == EMBEDDED:
        return "real"
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".json":
        return "random"
    if path.is_dir() and (path / "config.json").is_file():
        return "real"
    raise ConfigError(f"{source!r} is not a preset ({', '.join(PRESETS)}), a config.json, a model folder or 'embedded'")


def source_config(source: str) -> tuple[str, dict]:
    """(model name, config dict) of a source."""
    if source == EMBEDDED:
        from ...models.loading import convert_gguf, embedded_gguf_path

        folder = convert_gguf(embedded_gguf_path(), load_settings().cache_dir)
        return "SmolLM2-135M-Instruct", read_config(str(folder))[1]
    return read_config(source)


def device_type(device: str) -> str:
    """ "cpu", "cuda" or "mps": where a run asked for on `device` would measure (ValueError says why not)."""
    return resolve_device(device).type
