"""The portal's entry point: `streamlit run Home.py` serves the pages (ui/frame.py declares them) and the HTTP API
(glm_core.api: OpenAI-compatible and the seeds' routes) on one port, from one process and one loaded model, so
browser chats and API clients share one batch.

Streamlit finds the `app` assignment below and serves it with uvicorn, which imports this file as the module
`Home`; every browser run executes this file as `__main__`, where the frame applies the access rules once and runs
the page asked for.
"""

import streamlit as st

if __name__ == "__main__":
    from ui.frame import run

    run()
else:
    from ui.api_mount import api_lifespan, api_routes

    app = st.App(__file__, routes=api_routes(), lifespan=api_lifespan)
