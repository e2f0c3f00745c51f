"""The chat sidebar's Generation section: sampling controls over the model's defaults (each with where its
default came from; the person's changes are kept for the workspace) and the system prompt with its presets."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from glm_core.conversations.store import Store
from glm_core.protocol import MAX_SYSTEM_PROMPT_CHARS
from glm_core.safe_markdown import plain
from glm_core.sampling_defaults import (
    CONTROLS,
    LABELS,
    card_defaults,
    clean_overrides,
    describe_sources,
    effective_controls,
)


@dataclass
class Generation:
    defaults: dict  # the model's defaults and their sources (card_defaults)
    own: dict  # this workspace's changes to them
    system_prompt: str
    thinking: bool | None = None  # a reasoning model's switch for this conversation (ui.reasoning); None: not offered
    tool_choice: str | None = None  # the next turn's tool choice (ui.tools_panel); None: the model takes no tools


def generation_controls(store: Store, workspace: str, card: dict | None) -> Generation:
    state = st.session_state
    defaults = card_defaults(card)
    controls = effective_controls(defaults, store.get_setting(workspace, "sampling", {}))
    if state.get("controls_for") != (workspace, defaults):  # first run, another model, another workspace
        state.update({name: value for name, (value, _) in controls.items()}, controls_for=(workspace, defaults))

    def keep_control() -> None:
        store.set_setting(workspace, "sampling", clean_overrides({name: state[name] for name in CONTROLS}, defaults))

    def reset_controls() -> None:
        store.set_setting(workspace, "sampling", {})
        state.update({name: value for name, (value, _) in effective_controls(defaults, {}).items()})

    def source_of(name: str) -> str:
        return f"{LABELS[name].capitalize()} default: {defaults[name]:g}, from {defaults['sources'][name]}"

    def kept(widget, label: str, *args, name: str, **kwargs) -> None:
        widget(label, *args, key=name, on_change=keep_control, help=source_of(name), **kwargs)

    kept(st.number_input, "Max length (context + reply tokens)", 64, 131072, step=512, name="max_length")
    kept(st.slider, "Max new tokens", 1, 4096, name="max_new_tokens")
    kept(st.slider, "Temperature (0 = greedy)", 0.0, 2.0, step=0.05, name="temperature")
    kept(st.slider, "Top p", 0.05, 1.0, step=0.05, name="top_p")
    kept(st.number_input, "Top k (0 = off)", 0, 1000, name="top_k")
    kept(st.slider, "Repetition penalty", 0.5, 2.0, step=0.05, name="repetition_penalty")
    own = clean_overrides({name: state[name] for name in CONTROLS}, defaults)
    for line in describe_sources(effective_controls(defaults, own), defaults):
        st.caption(plain(line))
    st.button("Reset to the model's defaults", key="reset_controls", on_click=reset_controls, width="stretch")
    return Generation(defaults, own, system_prompt_section(store, workspace))


def system_prompt_section(store: Store, workspace: str) -> str:
    """The system prompt, kept for the workspace as typed; this workspace's presets fill it."""
    state = st.session_state
    presets = store.list_presets(workspace)
    if "system_prompt" not in state:
        state.system_prompt = store.get_setting(workspace, "system_prompt", "")

    def apply_preset() -> None:
        state.system_prompt = presets.get(state.preset_choice, "")
        store.set_setting(workspace, "system_prompt", state.system_prompt)

    def save_preset() -> None:
        try:
            name = store.save_preset(workspace, state.get("preset_name", ""), state.system_prompt)
        except ValueError as exc:
            state.preset_error = str(exc)
        else:
            state.preset_choice, state.preset_name = name, ""

    system_prompt = st.text_area(
        "System prompt",
        key="system_prompt",
        max_chars=MAX_SYSTEM_PROMPT_CHARS,
        on_change=lambda: store.set_setting(workspace, "system_prompt", state.system_prompt),
    )
    with st.expander(f"System-prompt presets ({len(presets)})"):
        choice = st.selectbox(
            "Preset",
            list(presets),
            index=None,
            key="preset_choice",
            placeholder="Choose a preset" if presets else "None yet: save one below",
        )
        left, right = st.columns(2)
        left.button("Use", key="use_preset", on_click=apply_preset, disabled=choice is None, width="stretch")
        right.button(
            "Delete",
            key="delete_preset",
            disabled=choice is None,
            width="stretch",
            on_click=lambda: (store.delete_preset(workspace, choice), state.update(preset_choice=None)),
        )
        st.text_input("Preset name (saves the text above)", key="preset_name", max_chars=60)
        st.button("Save as preset", key="save_preset", on_click=save_preset, width="stretch")
        if "preset_error" in state:
            st.error(state.pop("preset_error"))
    return system_prompt
