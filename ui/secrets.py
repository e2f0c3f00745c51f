"""Reading .streamlit/secrets.toml: a missing file is no secrets; a file that cannot be read raises (a typo there
must not silently open a password-protected portal)."""

from __future__ import annotations

import streamlit as st


def _no_secrets_file(exc: FileNotFoundError) -> bool:
    return getattr(exc, "error_id", None) == "no-secrets-found"  # StreamlitSecretNotFoundError


def all_secrets() -> dict | None:
    """The secrets as a dict; None when there is no secrets file."""
    try:
        return st.secrets.to_dict()
    except FileNotFoundError as exc:
        if _no_secrets_file(exc):
            return None
        raise


def secret_section(name: str) -> dict | None:
    """One table of the secrets ([backends], for instance); None when absent."""
    value = (all_secrets() or {}).get(name)
    return dict(value) if value else None


def read_secret(name: str) -> str | None:
    """One value; None when there is no secrets file or it is not set."""
    value = (all_secrets() or {}).get(name)
    return str(value) if value not in (None, "") else None
