"""The Admin page's sections: API keys, usage (tables, charts, CSV), quotas, the audit log and access per backend.
Every change goes through glm_core.admin and into the audit log; a new key is shown once, in the run that made it."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pandas as pd
import streamlit as st

from glm_core.admin import SELF_SERVICE_KEYS
from glm_core.admin.keys import KeyProblem
from glm_core.admin.quotas import DEFAULT, Quota
from glm_core.admin.usage import to_csv, usage_records, usage_summary
from glm_core.safe_markdown import plain
from ui.accounting import account, audit, get_admin
from ui.resources import get_hub

_NEW_KEY = "admin_new_key"  # session_state: (name, key) of the key made by the last click, shown once


def _when(at: float | None) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M") if at else ""


def _show_new_key() -> None:
    made = st.session_state.pop(_NEW_KEY, None)
    if made:
        st.success(f"Key {plain(made[0])} created. It is shown this once: copy it now.")
        st.code(made[1], language=None)


def _create_key(owner: str | None, prefix: str) -> None:
    state = st.session_state
    name = (state.get(f"{prefix}_name") or "").strip()
    days = state.get(f"{prefix}_days")
    admin_key = bool(state.get(f"{prefix}_admin")) and owner is None
    try:
        record, key = get_admin().keys.create(
            name, admin=admin_key, expires_days=days or None, owner=owner, created_by=account()[0]
        )
    except KeyProblem as exc:
        state[f"{prefix}_error"] = str(exc)
        return
    audit("key.create", record.name, {"admin": record.admin, "owner": owner, "expires_at": record.expires_at})
    state[_NEW_KEY] = (record.name, key)
    state[f"{prefix}_name"] = ""


def _revoke_key(name: str | None, owner: str | None) -> None:
    if not name:
        return
    try:
        get_admin().keys.revoke(name, owner=owner)
    except KeyProblem as exc:
        st.session_state.admin_key_error = str(exc)
        return
    audit("key.revoke", name)


def _key_table(keys) -> None:
    if not keys:
        st.caption("No keys yet.")
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "Name": k.name,
                    "Starts with": k.prefix + "…",
                    "State": k.state(),
                    "Admin": k.admin,
                    "Owner": k.owner or "",
                    "Created": _when(k.created_at),
                    "Expires": _when(k.expires_at),
                    "Last used": _when(k.last_used_at),
                }
                for k in keys
            ]
        ),
        hide_index=True,
        key=f"keys_table_{len(keys)}",
    )


def key_form(owner: str | None, prefix: str) -> None:
    with st.form(f"{prefix}_form"):
        st.text_input("Name", key=f"{prefix}_name", max_chars=64, placeholder="alice-laptop")
        st.number_input("Expires after (days, empty: never)", min_value=1, value=None, key=f"{prefix}_days")
        if owner is None:
            st.checkbox("Admin key (may also call /free_gc)", key=f"{prefix}_admin")
        st.form_submit_button("Create key", key=f"{prefix}_create", on_click=_create_key, args=(owner, prefix))
    if st.session_state.get(f"{prefix}_error"):
        st.error(plain(st.session_state.pop(f"{prefix}_error")))


def keys_section() -> None:
    accounts = get_admin()
    _show_new_key()
    keys = accounts.keys.list()
    _key_table(keys)
    live = [k.name for k in keys if k.state() == "active"]
    if live:
        row = st.container(horizontal=True, vertical_alignment="bottom")
        chosen = row.selectbox("Key to revoke", live, key="revoke_key_name")
        row.button("Revoke", key="revoke_key", on_click=_revoke_key, args=(chosen, None))
    if st.session_state.get("admin_key_error"):
        st.error(plain(st.session_state.pop("admin_key_error")))
    st.subheader("New key")
    key_form(None, "new_key")
    allowed = bool(accounts.setting(SELF_SERVICE_KEYS, False))

    def toggle() -> None:
        value = bool(st.session_state.self_service_keys)
        accounts.set_setting(SELF_SERVICE_KEYS, value)
        audit("settings.change", SELF_SERVICE_KEYS, {"value": value})

    st.toggle(
        "Signed-in people may create their own keys",
        value=allowed,
        key="self_service_keys",
        on_change=toggle,
        help="On the Admin page, each sees and revokes only their own",
    )


def own_keys_section() -> None:
    """For a signed-in person, when the admins allow it: their own keys."""
    who, kind = account()
    if kind != "person" or not get_admin().setting(SELF_SERVICE_KEYS, False):
        return
    st.subheader("Your API keys")
    _show_new_key()
    mine = get_admin().keys.list(owner=who)
    _key_table(mine)
    live = [k.name for k in mine if k.state() == "active"]
    if live:
        row = st.container(horizontal=True, vertical_alignment="bottom")
        chosen = row.selectbox("Key to revoke", live, key="own_revoke_name")
        row.button("Revoke", key="own_revoke", on_click=_revoke_key, args=(chosen, who))
    key_form(who, "own_key")


def usage_section() -> None:
    accounts = get_admin()
    accounts.usage.flush(timeout=2)
    since = st.date_input("Since", value=date.today() - timedelta(days=30), key="usage_since")
    since_text = since.strftime("%Y-%m-%d") if since else None
    rows = usage_summary(accounts.db, since_text, ("person", "model", "day"))
    if not rows:
        st.caption("No usage recorded in this period.")
        return
    table = pd.DataFrame(rows)
    left, right = st.columns(2)
    with left:
        st.caption("Tokens per day, by person")
        st.bar_chart(table, x="day", y="total_tokens", color="person", height=260)
    with right:
        st.caption("Tokens per day, by model")
        st.bar_chart(table, x="day", y="total_tokens", color="model", height=260)
    st.caption("Per person, model and day")
    st.dataframe(table, hide_index=True, key="usage_table")
    per_person = pd.DataFrame(usage_summary(accounts.db, since_text, ("person",)))
    st.caption("Per person")
    st.dataframe(per_person, hide_index=True, key="usage_people")
    st.download_button(
        "Download every request (CSV)",
        to_csv(usage_records(accounts.db, since_text)),
        file_name=f"usage-since-{since_text}.csv",
        mime="text/csv",
        key="usage_csv",
    )


def _set_quota() -> None:
    state = st.session_state
    name = (state.get("quota_name") or "").strip() or DEFAULT
    quota = Quota(state.get("quota_tokens"), state.get("quota_rpm"), state.get("quota_running"))
    get_admin().quotas.set(name, quota, by=account()[0])
    audit("quota.set", name, quota.public())


def quotas_section() -> None:
    quotas = get_admin().quotas.all()
    if quotas:
        st.dataframe(
            pd.DataFrame(
                [{"Name": "everyone (default)" if n == DEFAULT else n, **q.public()} for n, q in quotas.items()]
            ),
            hide_index=True,
            key=f"quota_table_{len(quotas)}",
        )
    else:
        st.caption("No quotas: only the queue's limits apply.")
    with st.form("quota_form"):
        st.text_input("Person or key (empty: everyone without their own)", key="quota_name", max_chars=200)
        st.number_input("Tokens per day (empty: no limit)", min_value=0, value=None, step=1000, key="quota_tokens")
        st.number_input("Requests per minute", min_value=0, value=None, key="quota_rpm")
        st.number_input("Replies running at once", min_value=0, value=None, key="quota_running")
        st.form_submit_button("Set quota", key="quota_set", on_click=_set_quota)
    st.caption("All three empty removes the quota. Past one, the API answers 429 and the chat hands the prompt back.")


def audit_section() -> None:
    entries = [e.public() for e in get_admin().audit.entries(limit=5000)]
    if not entries:
        st.caption("Nothing recorded yet.")
        return
    rows = [{**e, "at": _when(e["at"]), "detail": json.dumps(e["detail"], ensure_ascii=False)} for e in entries]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="audit_table")
    st.download_button("Download the audit log (CSV)", to_csv(rows), file_name="audit.csv", key="audit_csv")


def _restrict(name: str) -> None:
    text = st.session_state.get(f"access_{name}") or ""
    allowed = [part for part in text.replace(",", " ").split() if part]
    get_admin().backend_access.restrict(name, allowed, by=account()[0])
    audit("backend.access", name, {"allowed": sorted(a.lower() for a in allowed)})


def backends_section() -> None:
    rules = get_admin().backend_access.rules()
    st.caption(
        "Leave empty for everyone. Otherwise list people (emails or sign-in identities) and groups (group:NAME, "
        "from the sign-in provider's `groups` claim); others do not see the backend. Admins see every backend."
    )
    for name in get_hub().names():
        with st.form(f"access_form_{name}"):
            st.text_input(
                f"Who may use {name}", value=", ".join(rules.get(name, [])), key=f"access_{name}", max_chars=2000
            )
            st.form_submit_button("Save", key=f"access_save_{name}", on_click=_restrict, args=(name,))
