"""Chat page: talk to the shared model; each reply shows its token counts and speed."""

import streamlit as st

from app_shared import ensure_engine, get_hub, load_with_progress
from glm_core import ConversationBusy, ModelSpec, Queued, SamplingParams, Started, Truncated
from glm_core.conversation import Conversation

MAX_PROMPT_CHARS = 32_000

st.set_page_config(page_title="GLM Chat", page_icon="💬", layout="wide")

if "conversation" not in st.session_state:
    st.session_state.conversation = Conversation()
conversation: Conversation = st.session_state.conversation


def forget_and_reset(new_id: bool) -> None:
    engine = get_hub().engine
    if engine is not None:
        engine.forget(conversation.id)
    st.session_state.conversation = Conversation() if new_id else Conversation(id=conversation.id)


engine = ensure_engine()

with st.sidebar:
    st.header("Model")
    if engine is not None:
        card = engine.loaded.card()
        st.markdown(f"**{card['name']}**")
        st.caption(
            f"family {card['family']} · {card['precision']} · {card['device']} · "
            f"{card['parameters'] / 1e6:,.0f}M parameters · loaded in {card['load_seconds']:.1f} s"
        )
        if "checkpoint" in card:
            st.caption(card["checkpoint"])
        memory = engine.memory_report()
        st.caption(
            f"weights {card['weights_bytes'] / 2**20:,.0f} MiB "
            f"({card['quantized_weights_bytes'] / 2**20:,.0f} MiB quantized) · "
            f"KV cache {card['kv_bytes_per_token'] / 1024:,.1f} KiB/token · "
            f"{memory['source']} {memory['current'] / 2**20:,.0f} MiB (peak {memory['peak'] / 2**20:,.0f} MiB) · "
            f"kept caches {memory['kv_cache_bytes'] / 2**20:,.1f} MiB for {memory['kv_cache_conversations']} conversation(s)"
        )
    with st.expander("Load another model", expanded=engine is None):
        with st.form("load_model"):
            current = engine.loaded.spec if engine is not None else ModelSpec.from_settings()
            path = st.text_input(
                "Model folder or .gguf file", value=current.path, help="'embedded' is the built-in model", key="load_path"
            )
            precision = st.selectbox("Precision", ["auto", "fp32", "bf16", "fp16", "int8", "int4"], key="load_precision")
            device = st.selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="load_device")
            family = st.selectbox(
                "ChatGLM family", ["auto", "chatglm2", "chatglm3"], key="load_family",
                help="For ChatGLM checkpoints in the original layout: overrides what the folder suggests",
            )
            if st.form_submit_button("Load", key="load_button"):
                spec = ModelSpec(path.strip() or "embedded", precision, device, family)
                engine = load_with_progress(spec)  # on failure it shows why and returns the running engine
                if engine is not None and engine.loaded.spec == spec:
                    st.rerun()  # redraw the model card

    st.header("Generation")
    max_length = st.number_input("Max length (context + reply tokens)", 64, 131072, 8192, step=512, key="max_length")
    max_new_tokens = st.slider("Max new tokens", 1, 4096, 1024, key="max_new_tokens")
    temperature = st.slider("Temperature (0 = greedy)", 0.0, 2.0, 0.8, 0.05, key="temperature")
    top_p = st.slider("Top p", 0.05, 1.0, 0.8, 0.05, key="top_p")
    top_k = st.number_input("Top k (0 = off)", 0, 1000, 0, key="top_k")
    repetition_penalty = st.slider("Repetition penalty", 0.5, 2.0, 1.0, 0.05, key="repetition_penalty")
    system_prompt = st.text_area("System prompt", "", key="system_prompt")

    left, right = st.columns(2)
    left.button("New conversation", on_click=forget_and_reset, args=(True,), width="stretch", key="new_conversation")
    right.button("Clear", on_click=forget_and_reset, args=(False,), width="stretch", key="clear")

st.title("GLM Chat")
if engine is None:
    st.info("No model is loaded. Choose one in the sidebar.")

for message in conversation.messages:
    with st.chat_message(message.role):
        st.markdown(message.content)
        if message.error:
            st.error(message.error)
        if message.stats:
            st.caption(message.stats_line())

prompt = st.chat_input("Ask anything", max_chars=MAX_PROMPT_CHARS, submit_mode="stop", disabled=engine is None)
if prompt is not None and prompt.strip() and engine is not None:
    prompt = prompt.strip()
    try:
        params = SamplingParams(
            max_length=int(max_length),
            max_new_tokens=min(int(max_new_tokens), int(max_length) - 1),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            repetition_penalty=float(repetition_penalty),
        ).validate()
        request = engine.submit(conversation.id, conversation.model_messages(system_prompt, prompt), params)
    except (ValueError, ConversationBusy) as exc:
        st.error(str(exc))
        st.stop()

    with st.chat_message("user"):
        st.markdown(prompt)
    with st.chat_message("assistant"):
        status, notes = st.empty(), []

        def on_event(event):
            if isinstance(event, Queued):
                status.info(f"Waiting for the model: {event.position} request(s) ahead of yours.")
            elif isinstance(event, Started):
                status.empty()
            elif isinstance(event, Truncated):
                notes.append(event.describe())

        try:
            st.write_stream(request.text_stream(on_event))
        finally:
            # Also runs when the user presses stop: the partial reply is kept and marked stopped.
            if not request.done:
                request.stop()
            reply = request.wait(timeout=60)
            if reply is not None and (reply.text or not reply.error):
                conversation.add_user(prompt)
                conversation.add_reply(reply)
        for note in notes:
            st.info(note)
        if reply is not None and reply.error:
            st.error(reply.error)
            if not reply.text:
                st.caption("Your message was not added to the conversation; here it is to edit and resend:")
                st.code(prompt, language=None)
        elif reply is not None:
            st.caption(conversation.messages[-1].stats_line())
