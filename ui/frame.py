"""The frame every browser run goes through (Home.py): it declares the pages, applies the access rules once (the
access password, sign-in, this browser's workspace; a share link opens no workspace) and runs the page."""

from __future__ import annotations

import streamlit as st

from ui.access import open_workspace, require_signed_in

# (script, title, icon): the first is the default page, at the portal's root address; the others are served at
# their file's name (/GPU_monitor, ...). The scripts live in ui/pages/, not pages/: Streamlit would also serve a
# pages/ folder's scripts on their own, around the frame and its access rules.
PAGES = [
    ("ui/pages/chat.py", "Chat", "💬"),
    ("ui/pages/GPU_monitor.py", "GPU monitor", "📈"),
    ("ui/pages/Quantization.py", "Quantization", "⚖️"),
    ("ui/pages/Conversations.py", "Conversations", "🗂️"),
    ("ui/pages/Shared.py", "Shared", "🔗"),
    ("ui/pages/Admin.py", "Admin", "🛡️"),
]
URL_PATHS = [path.rsplit("/", 1)[1].removesuffix(".py") for path, *_ in PAGES[1:]]
OPENS_NO_WORKSPACE = {"Shared"}  # a share link shows one conversation and nothing of anyone's


def run() -> None:
    page = st.navigation(
        [st.Page(path, title=title, icon=icon, default=index == 0) for index, (path, title, icon) in enumerate(PAGES)]
    )
    if page.url_path in OPENS_NO_WORKSPACE:
        require_signed_in()
    else:
        open_workspace()
    page.run()
