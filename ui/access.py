"""Who may see what: the access password, sign-in, the admin role and this browser's workspace. The frame
(Home.py) applies them once per run, before any page draws; pages ask `current_workspace()` and `is_admin()`."""

from __future__ import annotations

import secrets

import streamlit as st

from glm_core.access import AttemptThrottle, RolePolicy, is_local_client, refusal, throttle_keys
from glm_core.conversations.workspace import auth_configured, is_url_workspace_id, password_matches, user_identity
from glm_core.safe_markdown import plain
from ui.resources import get_store
from ui.secrets import all_secrets, read_secret

WORKSPACE_PARAM = "ws"
_CURRENT = "frame_workspace"  # session_state key: the workspace the frame opened in this run


@st.cache_resource(show_spinner=False)
def get_throttle() -> AttemptThrottle:
    """Failed password attempts of every session of this server process."""
    return AttemptThrottle()


def client_address() -> str | None:
    """This browser's address as the server saw it; None for this machine (Streamlit's answer for 127.0.0.1 and ::1,
    and for a session with no browser connection, as under AppTest)."""
    address = st.context.ip_address
    return address if isinstance(address, str) and address else None


def checked_password(given: str, expected: str, what: str) -> bool:
    """Compare a password under the attempt throttle; shows why a refused attempt was refused."""
    session = st.session_state.setdefault("attempt_session", secrets.token_hex(8))
    client = client_address() or "local"  # this machine (or a local proxy)
    outcome = get_throttle().attempt(
        throttle_keys(session, client), lambda: password_matches(given or "", expected), what, client
    )
    if outcome is True:
        return True
    st.error("Wrong password." if outcome is False else refusal(outcome))
    return False


def require_access_password() -> None:
    """When secrets.toml sets `access_password`, show nothing else until this browser session has given it."""
    expected = read_secret("access_password")
    if expected is None or st.session_state.get("access_granted"):
        return
    st.title("GLM Chat")
    with st.form("access_form"):
        given = st.text_input("Access password", type="password", key="access_password_input")
        submitted = st.form_submit_button("Enter", key="access_submit")
    if submitted and checked_password(given, expected, "access password"):
        st.session_state.access_granted = True
        st.rerun()
    st.stop()


def _require_sign_in(what: str) -> None:
    """With Streamlit auth configured, nothing shows until the person signs in."""
    user = st.user.to_dict()
    if auth_configured(user) and user_identity(user) is None:
        st.title("GLM Chat")
        st.info(f"Sign in to see {what}.")
        if st.button("Sign in", key="sign_in"):
            st.login()
        st.stop()


# ---- the admin role ------------------------------------------------------------------------------------------


def role_policy() -> RolePolicy:
    return RolePolicy.from_secrets(all_secrets())


def is_admin() -> bool:
    """Whether this browser session may load, unload and switch models, free memory and run large benchmarks."""
    policy = role_policy()
    return bool(
        (policy.local_admins and is_local_client(client_address()))
        or policy.is_listed_admin(st.user.to_dict())
        or (policy.admin_password is not None and st.session_state.get("admin_granted") is True)
    )


def admin_panel() -> bool:
    """In the sidebar: who is admin here, the admin password form where there is one; returns is_admin()."""
    policy = role_policy()
    admin = is_admin()
    with st.sidebar:
        if policy.local_admins:
            st.caption(policy.describe(local=admin))
        elif admin:
            st.caption("You are an admin on this portal.")
            if st.session_state.get("admin_granted"):
                st.button("Leave admin", key="admin_leave", on_click=_leave_admin)
        else:
            st.caption(policy.describe())
            if policy.admin_password is not None:
                with st.expander("Admin sign-in"), st.form("admin_form"):
                    given = st.text_input("Admin password", type="password", key="admin_password_input")
                    if st.form_submit_button("Become admin", key="admin_submit") and checked_password(
                        given, policy.admin_password, "admin password"
                    ):
                        st.session_state.admin_granted = True
                        _audit("role.admin_granted", "admin password")
                        st.rerun()
    return admin


def _leave_admin() -> None:
    _audit("role.admin_left", "admin password")
    st.session_state.pop("admin_granted")


def _audit(action: str, target: str) -> None:
    from ui.accounting import audit  # it reads this module's rules

    audit(action, target)


# ---- the workspace -------------------------------------------------------------------------------------------


def open_workspace() -> str:
    """Apply the access rules and return this browser's workspace id (the frame calls it once per run).

    - With Streamlit auth configured, nothing shows until the user signs in; the workspace is the one of their
      identity, and the URL plays no part.
    - Otherwise the workspace is the one this browser session already has, else the URL's `?ws=` if it is a
      well-formed id of an existing browser workspace, else a new one; the URL always shows it (a refresh or a
      bookmark keeps it; navigating between pages drops query parameters, the session puts it back).
    """
    require_access_password()
    _require_sign_in("your conversations")
    store = get_store()
    user = st.user.to_dict()
    if auth_configured(user):
        workspace = store.workspace_for_owner(user_identity(user))
        if WORKSPACE_PARAM in st.query_params:
            del st.query_params[WORKSPACE_PARAM]
        with st.sidebar:
            st.caption(f"Signed in as {plain(str(user.get('email') or user.get('name') or 'you'))}")
            if st.button("Sign out", key="sign_out"):
                st.logout()
    else:
        workspace = st.session_state.get("workspace")
        if workspace is None or not store.workspace_exists(workspace):
            candidate = st.query_params.get(WORKSPACE_PARAM)
            if (
                is_url_workspace_id(candidate)
                and store.workspace_exists(candidate)
                and store.workspace_owner(candidate) is None
            ):  # a signed-in user's workspace is never opened by URL
                workspace = candidate
            else:
                workspace = store.create_workspace()
            st.session_state.workspace = workspace
        if st.query_params.get(WORKSPACE_PARAM) != workspace:
            st.query_params[WORKSPACE_PARAM] = workspace
    st.session_state[_CURRENT] = workspace
    return workspace


def current_workspace() -> str:
    """The workspace the frame opened for this run."""
    return st.session_state[_CURRENT]


def require_signed_in() -> None:
    """For pages that open no workspace (a share link): the access password, and with Streamlit auth configured,
    any signed-in user (the portal is the team's, not the internet's)."""
    require_access_password()
    _require_sign_in("this conversation")
