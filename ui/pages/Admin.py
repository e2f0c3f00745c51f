"""Admin page: API keys, usage per person, model and day, quotas, the audit log and who may use which backend.
A signed-in person who is not an admin sees only their own keys, where the admins allow them."""

import streamlit as st

from ui.access import admin_panel
from ui.admin_sections import (
    audit_section,
    backends_section,
    keys_section,
    own_keys_section,
    quotas_section,
    usage_section,
)

st.set_page_config(page_title="Admin", page_icon="🛡️", layout="wide")
admin = admin_panel()
st.title("Administration")

if not admin:
    own_keys_section()
    st.info("Keys, usage, quotas and the audit log are for admins.")
    st.stop()

keys, usage, quotas, audit, backends = st.tabs(["API keys", "Usage", "Quotas", "Audit log", "Backends"])
with keys:
    keys_section()
with usage:
    usage_section()
with quotas:
    quotas_section()
with audit:
    audit_section()
with backends:
    backends_section()
