"""The chat page's Compare mode: one prompt to 2-4 configurations at once (levels of the loaded model, the local
models loaded beside it, remote backends), each reply streaming in its own column with its figures; blind
columns, a vote, and the team's ranking. The work is glm_core's (conversations/compare.py, arena.py and the
hub's models beside the main one); this module only draws it."""

from __future__ import annotations

import time
from dataclasses import replace

import pandas as pd
import streamlit as st

from glm_core import ModelLoadError
from glm_core.admin.quotas import QuotaExceeded
from glm_core.backends.hub import BackendHub
from glm_core.conversations.arena import MAX_COLUMNS, Arena, ArenaError, export_comparisons, pair_records, ranking
from glm_core.conversations.compare import CompareRun, CompareTarget
from glm_core.protocol import MAX_PROMPT_CHARS
from glm_core.safe_markdown import no_remote_images, plain
from glm_core.sampling_defaults import compose_params
from glm_core.settings import load_settings
from ui.accounting import admit_turn, quota_refusal, visible_backends
from ui.generation_controls import Generation

LEVELS = ["fp32", "bf16", "int8", "int4"]
STREAM_REDRAW_S = 0.15


@st.cache_resource(show_spinner=False)
def _arena_for(data_dir: str) -> Arena:
    return Arena(data_dir)


def get_arena() -> Arena:
    return _arena_for(str(load_settings().data_dir))


def _options(hub: BackendHub, admin: bool) -> dict[str, tuple[str, str]]:
    """label -> (kind, what): the local models loaded now, the remote backends, and for admins the other levels
    of the main local model (loaded beside it when compared)."""
    options: dict[str, tuple[str, str]] = {}
    for label, backend in hub.local_models().items():
        options[backend.turn_name] = ("local", label)
    for name in visible_backends(hub.names()):  # the servers this person may use
        if not hub.is_local(name):
            options[f"remote {name}"] = ("remote", name)
    main = hub.engine
    if admin and main is not None and getattr(main, "loaded", None) is not None:
        for level in LEVELS:
            label = f"{main.loaded.name} {level.upper()}"
            options.setdefault(label, ("level", level))
    return options


def _target(hub: BackendHub, label: str, kind: str, what: str) -> CompareTarget:
    if kind == "local":
        return CompareTarget(label, hub.local_models()[what])
    if kind == "remote":
        return CompareTarget(label, hub.get(what))
    spec = replace(hub.engine.spec, precision=what)
    with st.spinner(f"Loading {label} beside the others…"):
        _, backend = hub.load_beside(spec)
    return CompareTarget(label, backend)


def _memory_line(hub: BackendHub) -> str:
    plan = hub.memory_plan()
    held = sum(m["bytes"] for m in plan["models"])
    budget = (
        f"GLM_MODELS_MEMORY_MB allows {plan['budget_bytes'] / 1e9:.2f} GB"
        if plan["budget_bytes"] is not None
        else f"no GLM_MODELS_MEMORY_MB: what is free decides ({plan['free_bytes'] / 1e9:.2f} GB now)"
    )
    models = ", ".join(f"{m['name']} {m['bytes'] / 1e9:.2f} GB" for m in plan["models"]) or "none"
    return f"Local models: {models} (weights + KV cache budgets; {held / 1e9:.2f} GB in all); {budget}."


def compare_view(hub: BackendHub, workspace: str, generation: Generation, admin: bool) -> None:
    arena = get_arena()
    options = _options(hub, admin)
    st.caption(
        "One prompt goes to every configuration at once; each reply streams in its own column with its figures. "
        "Blind: the columns are shuffled and named Answer A, B…; pick the better one, and the names show."
    )
    chosen = st.multiselect("Configurations (2-4)", list(options), max_selections=MAX_COLUMNS, key="compare_configs")
    blind = st.toggle("Blind (hide which is which until you vote)", value=True, key="compare_blind")
    st.caption(plain(_memory_line(hub)))
    if not admin:
        st.caption("Only admins load other levels beside the loaded model; loaded models and servers are listed.")

    prompt = st.chat_input(
        "One prompt to every column", max_chars=MAX_PROMPT_CHARS, key="compare_prompt", disabled=len(chosen) < 2
    )
    if prompt:
        tickets = []
        try:
            for _ in chosen:  # each column is a reply under the person's quotas
                tickets.append(admit_turn())
            targets = [_target(hub, label, *options[label]) for label in chosen]
            params, _ = compose_params(generation.defaults, saved=generation.own)
            messages = [{"role": "system", "content": generation.system_prompt}] if generation.system_prompt else []
            messages.append({"role": "user", "content": prompt})
            run = CompareRun(targets, messages, params, owner=workspace, blind=blind).start()
        except QuotaExceeded as exc:
            for ticket in tickets:
                ticket.cancel()
            quota_refusal(exc, prompt)
        except (ModelLoadError, ArenaError, ValueError) as exc:
            for ticket in tickets:
                ticket.cancel()
            st.error(plain(exc))
        else:
            st.session_state.compare_run = run
            try:
                _stream(run)
            finally:
                for ticket, column in zip(tickets, run.columns):
                    reply = column.request.reply if column.request is not None else None
                    ticket.finish(column.target.backend.card(), reply)
            run.finish(arena, workspace)
            st.rerun()

    run = st.session_state.get("compare_run")
    if run is not None:
        _show(run, arena, workspace)
    _ranking(arena, workspace)


def _stream(run: CompareRun) -> None:
    st.markdown(f"**{plain(run.messages[-1]['content'])}**")
    cells = []
    for index, column in enumerate(st.columns(len(run.columns))):
        column.subheader(plain(run.heading(index)))
        cells.append(column.empty())
    try:
        while True:
            done = run.done
            for cell, column in zip(cells, run.columns):
                cell.markdown(no_remote_images(column.text) or "…")
            if done:
                break
            time.sleep(STREAM_REDRAW_S)
    finally:
        if not run.done:  # the person left or pressed stop: every column stops, its partial reply kept
            run.stop()
            run.wait(30)


def _show(run: CompareRun, arena: Arena, workspace: str) -> None:
    st.markdown(f"**{plain(run.messages[-1]['content'])}**")
    for index, column in enumerate(st.columns(len(run.columns))):
        with column:
            st.subheader(plain(run.heading(index)))
            st.markdown(no_remote_images(run.columns[index].text))
            error = run.columns[index].error or (
                run.columns[index].request.reply.error if run.columns[index].request else None
            )
            if error:
                st.error(plain(error))
            if not run.blind or run.voted:
                st.caption(plain(run.columns[index].describe()))
    if run.comparison_id is None:
        return
    if run.voted:
        best = arena.comparison(workspace, run.comparison_id).best
        st.success("Your vote: " + ("a tie" if best == "tie" else plain(best)) + ". Thank you.")
        return
    buttons = st.columns(len(run.columns) + 1)
    for index, button in enumerate(buttons[:-1]):
        button.button(
            f"{run.heading(index)} is better",
            key=f"vote_{run.comparison_id}_{index}",
            on_click=run.vote,
            args=(arena, workspace, index),
        )
    buttons[-1].button("Tie", key=f"vote_{run.comparison_id}_tie", on_click=run.vote, args=(arena, workspace, None))


def _ranking(arena: Arena, workspace: str) -> None:
    votes = arena.votes()
    with st.expander(f"Blind-vote ranking of the team ({len(votes)} pairwise votes)", expanded=bool(votes)):
        if not votes:
            st.caption("No vote yet.")
        else:
            ranks = ranking(votes)
            st.dataframe(
                pd.DataFrame(
                    {
                        "Configuration": [r.config for r in ranks],
                        "Score (Bradley-Terry, Elo scale)": [round(r.score) for r in ranks],
                        "95 % interval": [f"{r.ci_low:.0f} – {r.ci_high:.0f}" for r in ranks],
                        "Votes": [r.votes for r in ranks],
                        "Win rate": [f"{r.win_rate * 100:.0f} %" for r in ranks],
                    }
                ),
                hide_index=True,
                key="compare_ranking",
            )
            st.caption(
                "Bradley-Terry fitted on every workspace's votes (a tie counts half a win each way); the intervals "
                "come from 200 bootstrap resamples of the votes: wide with few votes, a single point with one."
            )
            st.caption("Per pair of configurations (a tie counts half):")
            st.dataframe(
                pd.DataFrame(
                    [
                        {
                            "A": p.config_a,
                            "B": p.config_b,
                            "A wins": p.a_wins,
                            "B wins": p.b_wins,
                            "Ties": p.ties,
                            "A's win rate": f"{p.a_win_rate * 100:.0f} %",
                        }
                        for p in pair_records(votes)
                    ]
                ),
                hide_index=True,
                key="compare_pairs",
            )
        mine = arena.comparisons(workspace)
        st.caption(f"This workspace: {len(mine)} comparisons, {len(arena.votes(workspace))} pairwise votes.")
        left, right = st.columns(2)
        for column, fmt in ((left, "json"), (right, "csv")):
            column.download_button(
                f"Download this workspace's comparisons ({fmt.upper()})",
                export_comparisons(mine, fmt),
                file_name=f"glm-comparisons.{fmt}",
                mime="application/json" if fmt == "json" else "text/csv",
                key=f"compare_export_{fmt}",
                disabled=not mine,
            )
