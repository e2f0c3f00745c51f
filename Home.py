"""The portal's entry point: `streamlit run Home.py` serves the chat page (chat_page.py), the other pages (pages/)
and the HTTP API (glm_core.api: OpenAI-compatible and the seeds' routes) on one port, from one process and one
loaded model, so browser chats and API clients share one batch.

Streamlit finds the `app` assignment below and serves it with uvicorn, which imports this file as the module
`Home`; every browser run executes this file as `__main__` and shows the chat page. That is why the chat page
lives in a file of its own: a module cannot stop its own import half-way.
"""

import streamlit as st

from app_shared import api_lifespan, api_routes, run_page

if __name__ == "__main__":
    run_page("chat_page.py")
else:
    app = st.App(__file__, routes=api_routes(), lifespan=api_lifespan)
