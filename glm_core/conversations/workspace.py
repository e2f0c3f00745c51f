"""Workspaces: who sees which conversations.

A browser gets a workspace with a random id kept in its URL (`?ws=...`); a signed-in user (Streamlit auth) gets
the workspace of their identity instead. The pages resolve it (app_shared.open_workspace); these are the rules.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

# secrets.token_urlsafe(16): 16 random bytes, 22 URL-safe characters. The URL accepts nothing else, so a short,
# guessable id (one an admin may give the CLI) can never be opened from a browser.
URL_WORKSPACE_RE = re.compile(r"[A-Za-z0-9_-]{22}")
# What the CLI accepts: any plain name, so scripts may use their own.
CLI_WORKSPACE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_workspace_id() -> str:
    return secrets.token_urlsafe(16)


def is_url_workspace_id(value: object) -> bool:
    return isinstance(value, str) and URL_WORKSPACE_RE.fullmatch(value) is not None


def check_cli_workspace_id(value: str) -> str:
    if not CLI_WORKSPACE_RE.fullmatch(value or ""):
        raise ValueError(f"workspace ids are 1 to 64 letters, digits, '-' or '_'; got {value!r}")
    return value


def user_identity(user_info: dict) -> str | None:
    """The stable identity of a signed-in user (st.user.to_dict()), or None when nobody is signed in.

    The OpenID subject (unique per issuer) is preferred to the email, which a provider may let a user change.
    """
    if not user_info.get("is_logged_in"):
        return None
    subject, issuer, email = user_info.get("sub"), user_info.get("iss"), user_info.get("email")
    if subject:
        return f"{issuer or ''}|{subject}"
    if email:
        return f"email|{email.strip().lower()}"
    return None


def auth_configured(user_info: dict) -> bool:
    """Streamlit adds `is_logged_in` to st.user only when an [auth] section is configured."""
    return "is_logged_in" in user_info


def password_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of equal-length digests, so the response time tells neither how much of a guess
    was right nor how long the password is."""
    return hmac.compare_digest(
        hashlib.sha256(given.encode("utf-8")).digest(), hashlib.sha256(expected.encode("utf-8")).digest()
    )
