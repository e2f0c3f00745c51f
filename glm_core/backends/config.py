"""Which backends a portal offers: the local model and any number of remote servers, named.

From the environment, `GLM_BACKENDS` lists `name=target` entries separated by `;` or new lines; a target is a local
model ("embedded", a folder, a .gguf file; GLM_PRECISION, GLM_DEVICE... apply) or a remote URL
`http(s)://host:port/v1#model-id`:

    GLM_BACKENDS="local=embedded; glm4=http://gpu1:8000/v1#THUDM/glm-4-9b-chat"

A configured remote entry's API key comes from `GLM_BACKEND_<NAME>_KEY` (the name upper-cased, other characters as
`_`), else GLM_REMOTE_API_KEY. A key goes only to the URL it was configured with: a server added in the page (or a
URL typed in "Load another model") carries only the key typed with it, whatever its name. From `.streamlit/secrets.toml`, a `[backends.NAME]` table per backend (secrets win over the
environment):

    [backends.glm4]
    url = "http://gpu1:8000/v1"
    model = "THUDM/glm-4-9b-chat"
    api_key = "..."

    [backends.local]
    path = "embedded"
    precision = "int8"

At most one entry is local (one model in this process). The first entry is the default for new conversations.
Torch-free.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..protocol import ModelSpec
from .remote import KEY_ENV, is_remote, remote_spec

ENV = "GLM_BACKENDS"
DEFAULT_LOCAL_NAME = "local"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


@dataclass(frozen=True)
class BackendEntry:
    name: str
    spec: ModelSpec
    api_key: str | None = field(default=None, repr=False, compare=False)  # never printed, logged or shown
    from_settings: bool = field(default=False, compare=False)  # no backend configured: GLM_MODEL_PATH as it is now

    @property
    def remote(self) -> bool:
        return is_remote(self.spec.path)


def check_name(name: str) -> str:
    name = name.strip()
    if not _NAME.match(name):
        raise ValueError(f"a backend name is 1-40 letters, digits, '.', '_' or '-', got {name!r:.60}")
    return name


def key_env_name(name: str) -> str:
    return f"GLM_BACKEND_{re.sub(r'[^A-Za-z0-9]', '_', name).upper()}_KEY"


def make_entry(
    name: str,
    target: str,
    api_key: str | None = None,
    local_defaults: ModelSpec | None = None,
    env: Mapping[str, str] | None = None,
) -> BackendEntry:
    """One configured backend from a name and a target (URL or local path); a remote one without `api_key` takes
    its key from `env` (the process environment by default). Raises ValueError with a reason."""
    env = os.environ if env is None else env
    name, target = check_name(name), target.strip()
    if not target:
        raise ValueError(f"backend {name!r} names no model")
    if is_remote(target):
        return BackendEntry(
            name, remote_spec(target), api_key or env.get(key_env_name(name)) or env.get(KEY_ENV) or None
        )
    base = local_defaults or ModelSpec.from_settings()
    return BackendEntry(name, replace(base, path=target))


def typed_entry(name: str, target: str, api_key: str | None) -> BackendEntry:
    """A server someone added in the page: only the key typed with it, never a configured one."""
    return make_entry(name, target, api_key=api_key, env={})


def parse_backends_env(
    text: str, local_defaults: ModelSpec | None = None, env: Mapping[str, str] | None = None
) -> list[BackendEntry]:
    entries = []
    for item in re.split(r"[;\n]", text or ""):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        name, sep, target = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV}: each entry is name=model-or-URL, got {item!r:.80}")
        entries.append(make_entry(name, target, local_defaults=local_defaults, env=env))
    return _checked(entries)


def parse_backends_secrets(
    section: Mapping, local_defaults: ModelSpec | None = None, env: Mapping[str, str] | None = None
) -> list[BackendEntry]:
    """`[backends.NAME]` tables: `url` (+ `model`, `api_key`) for a remote server, or `path` (+ `precision`,
    `device`, `family`) for the local model."""
    entries = []
    for name, table in (section or {}).items():
        if not isinstance(table, Mapping):
            raise ValueError(f"secrets.toml: [backends.{name}] must be a table")
        if table.get("url"):
            url = str(table["url"]).split("#")[0]
            target = f"{url}#{table['model']}" if table.get("model") else url
            entries.append(make_entry(str(name), target, api_key=table.get("api_key") or None, env=env))
        elif table.get("path"):
            base = local_defaults or ModelSpec.from_settings()
            local = replace(base, **{k: str(table[k]) for k in ("precision", "device", "family") if table.get(k)})
            entries.append(make_entry(str(name), str(table["path"]), local_defaults=local, env=env))
        else:
            raise ValueError(f"secrets.toml: [backends.{name}] needs `url` (remote) or `path` (local model)")
    return _checked(entries)


def _checked(entries: list[BackendEntry]) -> list[BackendEntry]:
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"backend names must differ: {', '.join(duplicates)} is given twice")
    if sum(not e.remote for e in entries) > 1:
        raise ValueError("at most one backend is a local model (one model in this process); the others are URLs")
    return entries


def configured_backends(
    secrets_section: Mapping | None = None, env: Mapping[str, str] | None = None
) -> list[BackendEntry]:
    """The portal's backends: secrets.toml's [backends] when it has any, else GLM_BACKENDS, else the one local model
    of GLM_MODEL_PATH (named "local")."""
    env = os.environ if env is None else env
    if secrets_section:
        return parse_backends_secrets(secrets_section, env=env)
    if env.get(ENV, "").strip():
        return parse_backends_env(env[ENV], env=env)
    spec = ModelSpec.from_settings()
    if is_remote(spec.path):
        return [make_entry(DEFAULT_LOCAL_NAME, spec.path, env=env)]
    return [BackendEntry(DEFAULT_LOCAL_NAME, spec, from_settings=True)]


def conversation_backend(
    stored: str | None, available: list[str], default: str | None
) -> tuple[str | None, str | None]:
    """Which backend a conversation talks to: the one it remembers while it is offered, else the default. Returns
    (name, note); the note says why a remembered one was not used."""
    if stored and stored in available:
        return stored, None
    if stored:
        return (
            default,
            f"This conversation used the model {stored!r}, which is not offered any more; it now talks to {default!r}.",
        )
    return default, None
