"""The pages' side of team administration (glm_core.admin): whose usage and quotas a browser turn counts against,
the quota refusal that hands the prompt back, what is left today, the audit entries of admin actions taken in the
pages, and which backends this person may see."""

from __future__ import annotations

import streamlit as st

from glm_core.admin import Admin, admin_for
from glm_core.admin.backend_access import Person
from glm_core.admin.quotas import QuotaExceeded, Ticket
from glm_core.conversations.workspace import user_identity
from glm_core.safe_markdown import plain
from ui.access import client_address, current_workspace, is_admin


def get_admin() -> Admin:
    """The process's keys, usage, quotas and audit log (the API's too), for GLM_DATA_DIR's folder."""
    return admin_for()


def account() -> tuple[str, str]:
    """(who, kind): a signed-in person by email (else their identity); otherwise this browser's workspace."""
    user = st.user.to_dict()
    identity = user_identity(user)
    if identity is not None:
        return str(user.get("email") or identity).strip().lower(), "person"
    return current_workspace(), "workspace"


def actor() -> str:
    """Who an audit entry names: the signed-in person, else how this browser is admin."""
    who, kind = account()
    if kind == "person":
        return who
    if st.session_state.get("admin_granted"):
        return f"admin-password session (workspace {who})"
    return f"local browser (workspace {who})"


def audit(action: str, target: str | None = None, detail: dict | None = None) -> None:
    get_admin().audit.record(actor(), action, target, detail, client_address() or "local")


def admit_turn() -> Ticket:
    """A place for this person's next reply under their quotas, or QuotaExceeded."""
    who, kind = account()
    return get_admin().quotas.admit(who, kind, "browser")


def quota_refusal(exc: QuotaExceeded, prompt: str | None) -> None:
    """The refusal in the page, what is left today, and the prompt handed back to send later."""
    st.error(plain(str(exc)), icon=":material/block:")
    left = quota_left()
    if left:
        st.caption(left)
    if prompt:
        st.caption("Your message was not sent; here it is to resend later:")
        st.code(prompt, language=None, wrap_lines=True)


def quota_left() -> str | None:
    who, _ = account()
    left = get_admin().quotas.left_today(who)
    if left is None:
        return None
    return f"Tokens left today: {left[0]:,} of {left[1]:,} (resets at midnight UTC)."


def person() -> Person:
    return Person.from_user_info(st.user.to_dict(), admin=is_admin())


def visible_backends(names: list[str]) -> list[str]:
    """The backends of `names` this person may use (an admin restricts one on the Admin page)."""
    return get_admin().backend_access.visible(names, person())


def share_link(store, workspace: str, conversation_id: str) -> None:
    """Make a conversation's share link, in the audit log (the conversation's id, never its text)."""
    store.share(workspace, conversation_id)
    audit("share.create", conversation_id)


def stop_sharing(store, workspace: str, conversation_id: str) -> None:
    store.revoke_share(workspace, conversation_id)
    audit("share.revoke", conversation_id)
