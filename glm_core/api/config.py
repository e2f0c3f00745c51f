"""The HTTP API's settings, read in one place: who may call it (API keys, the network) and the bounds on a request.

GLM_API_KEYS                 keys that may call every route but /free_gc, separated by commas or spaces
GLM_API_ADMIN_KEYS           keys that may also call the routes that change the server (/free_gc)
GLM_API_OPEN_TO_NETWORK      1: without keys, answer clients on other machines too (default: this machine only)
GLM_API_ALLOWED_HOSTS        without keys, the names besides localhost / 127.0.0.1 / [::1] that requests may be
                             addressed to (their Host header) and that pages calling the API may come from (Origin)
GLM_API_SEEDS_WITHOUT_KEY    1: the seeds' routes (/, /chat, /stream, /chat-stream, /tokenize, /embedding) answer
                             without a key, for their old clients that send none; /v1 and /free_gc still need one
GLM_API_MAX_BODY_MB          request bodies larger than this are refused with 413 (default 4)
GLM_API_MAX_TOKENS           the most tokens one request may ask to generate (default 4096)
GLM_API_DEFAULT_MAX_TOKENS   the reply's limit when a request names none (default 1024, at most GLM_API_MAX_TOKENS;
                             as llama.cpp's server's -n): a bound on what a client that never sets max_tokens costs
GLM_API_MAX_EMBEDDING_INPUTS texts one embeddings request may hold (default 256)
GLM_API_MAX_EMBEDDING_TOKENS tokens one embeddings request may hold, all inputs together (default 32768)
GLM_API_MAX_TEXT_CHARS       characters of one text to tokenize or embed (default 100000: the tokenizer's lock is
                             the decode loop's too, and 100,000 characters hold it for about 0.1 s)

Keys may also come from `.streamlit/secrets.toml` (the project's, then ~/.streamlit/, as Streamlit reads them):
`api_keys = ["...", ...]` and `api_admin_keys = ["..."]`; keys from both places are accepted.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..settings import PROJECT_ROOT, _positive_int

SECRETS_FILES = (Path.home() / ".streamlit" / "secrets.toml", PROJECT_ROOT / ".streamlit" / "secrets.toml")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int = 4 * 2**20
    max_tokens: int = 4096
    default_max_tokens: int = 1024  # when a request names none (SamplingParams' default)
    max_embedding_inputs: int = 256
    max_embedding_tokens: int = 32768
    max_text_chars: int = 100_000
    retry_after_s: int = 1  # what a 429 tells a client to wait; the queue moves at every finished reply


@dataclass(frozen=True)
class ApiConfig:
    keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    open_to_network: bool = False
    seeds_without_key: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    limits: ApiLimits = ApiLimits()

    @property
    def keys_configured(self) -> bool:
        return bool(self.keys or self.admin_keys)


def load_api_config(env: Mapping[str, str] | None = None, secrets_files=SECRETS_FILES) -> ApiConfig:
    """Read the environment and the secrets files. A secrets file that cannot be read raises ValueError: a typo
    there must not silently leave the API without its keys."""
    env = os.environ if env is None else env
    keys, admin_keys = _split(env.get("GLM_API_KEYS", "")), _split(env.get("GLM_API_ADMIN_KEYS", ""))
    for path in secrets_files:
        secrets = _read_secrets(Path(path))
        keys += _key_list(secrets.get("api_keys"), path, "api_keys")
        admin_keys += _key_list(secrets.get("api_admin_keys"), path, "api_admin_keys")
    max_tokens = _positive_int(env, "GLM_API_MAX_TOKENS") or ApiLimits.max_tokens
    limits = ApiLimits(
        max_body_bytes=(_positive_int(env, "GLM_API_MAX_BODY_MB") or 4) * 2**20,
        max_tokens=max_tokens,
        default_max_tokens=min(
            _positive_int(env, "GLM_API_DEFAULT_MAX_TOKENS") or ApiLimits.default_max_tokens, max_tokens
        ),
        max_embedding_inputs=_positive_int(env, "GLM_API_MAX_EMBEDDING_INPUTS") or ApiLimits.max_embedding_inputs,
        max_embedding_tokens=_positive_int(env, "GLM_API_MAX_EMBEDDING_TOKENS") or ApiLimits.max_embedding_tokens,
        max_text_chars=_positive_int(env, "GLM_API_MAX_TEXT_CHARS") or ApiLimits.max_text_chars,
    )
    return ApiConfig(
        keys=tuple(dict.fromkeys(keys)),
        admin_keys=tuple(dict.fromkeys(admin_keys)),
        open_to_network=env.get("GLM_API_OPEN_TO_NETWORK", "").strip().lower() in _TRUE,
        seeds_without_key=env.get("GLM_API_SEEDS_WITHOUT_KEY", "").strip().lower() in _TRUE,
        allowed_hosts=frozenset(name.lower() for name in _split(env.get("GLM_API_ALLOWED_HOSTS", ""))),
        limits=limits,
    )


def _split(text: str) -> list[str]:
    return [key for key in re.split(r"[\s,]+", text) if key]


def _read_secrets(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the secrets file ({exc})") from None


def _key_list(value, path, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return _split(value)
    if isinstance(value, list) and all(isinstance(key, str) for key in value):
        return [key for key in value if key]
    raise ValueError(f"{path}: {name} must be a list of strings")
