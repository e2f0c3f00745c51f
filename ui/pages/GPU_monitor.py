"""GPU monitor page: the loaded model and two ways to free memory, then live figures refreshed every couple of
seconds (each NVIDIA GPU and its processes, this process's allocator, host memory) and the last minutes as charts."""

import pandas as pd
import streamlit as st

from glm_core import ModelSpec
from glm_core.safe_markdown import plain
from glm_core.telemetry.charts import time_chart
from glm_core.telemetry.memory import MemoryInUse, format_bytes, free_cached_memory
from ui.access import admin_panel
from ui.accounting import audit
from ui.render import model_line
from ui.resources import get_hub, get_monitor

st.set_page_config(page_title="GPU monitor", page_icon="📈", layout="wide")
admin = admin_panel()
hub = get_hub()
monitor = get_monitor()
state = st.session_state

st.title("GPU monitor")

# ---- the loaded model, and freeing memory --------------------------------------------------------------------

UNLOAD_EFFECTS = (
    "It stops everyone's chats: a reply being written stops where it is (the text so far is kept, marked stopped), "
    "and requests waiting in the queue end without a reply (their prompts are handed back to edit and resend). "
    "The chat page loads the default model again on its next visit."
)


@st.dialog("Unload the model?", on_dismiss=lambda: state.pop("pending_unload", None))
def confirm_unload(name: str) -> None:
    st.markdown(f"**{plain(name)}** will be unloaded for every user of this portal.")
    st.caption(UNLOAD_EFFECTS)
    left, right = st.columns(2)
    if left.button("Unload", type="primary", key="confirm_unload", width="stretch"):
        before = MemoryInUse.now()
        hub.unload()
        audit("model.unload", name)
        state.memory_report = f"Unloaded {plain(name)}: {free_cached_memory(before).describe()}."
        state.pop("pending_unload", None)
        st.rerun()
    if right.button("Cancel", key="cancel_unload", width="stretch"):
        state.pop("pending_unload", None)
        st.rerun()


engine = hub.engine
if engine is None:
    st.info(
        f"No model is loaded. The chat page loads the default model ({plain(ModelSpec.from_settings().path)}) "
        "on its next visit."
    )
else:
    model_line(engine)
if admin:
    actions = st.container(horizontal=True)
    if actions.button(
        "Free cached memory",
        key="free_memory",
        help="Collect garbage and hand the allocators' cached memory back (the seeds' torch_gc).",
    ):
        state.memory_report = f"Freed cached memory: {free_cached_memory().describe()}."
        audit("memory.free")
    actions.button(
        "Unload the model…",
        key="unload_model",
        disabled=engine is None,
        help=UNLOAD_EFFECTS,
        on_click=lambda: state.update(pending_unload=True),
    )
else:
    st.caption("Freeing memory and unloading the model are for admins.")
if state.get("pending_unload"):  # until confirmed, cancelled or dismissed
    if engine is None or not admin:  # someone else unloaded it meanwhile, or this session left admin
        state.pop("pending_unload")
    else:
        confirm_unload(engine.card().name)
if "memory_report" in state:
    st.success(state.pop("memory_report"))


# ---- live figures --------------------------------------------------------------------------------------------


def show_gpus(reading) -> None:
    if reading.error is not None:
        st.info(f"No NVIDIA GPU found: {reading.error}")
    for gpu in reading.gpus:
        st.subheader(f"GPU {gpu.index} · {plain(gpu.name or 'name unknown')}")
        if gpu.error is not None:
            st.error(f"GPU {gpu.index} could not be read: {gpu.error}")
            continue
        memory, utilization, temperature, power = st.columns(4)
        memory.metric(f"Memory used of {format_bytes(gpu.memory_total)}", format_bytes(gpu.memory_used))
        utilization.metric("Utilization", "n/a" if gpu.utilization_pct is None else f"{gpu.utilization_pct} %")
        temperature.metric("Temperature", "n/a" if gpu.temperature_c is None else f"{gpu.temperature_c} °C")
        watts = "n/a" if gpu.power_w is None else f"{gpu.power_w:.0f} W"
        limit = "" if gpu.power_limit_w is None else f" (limit {gpu.power_limit_w:.0f} W)"
        power.metric(f"Power{limit}", watts)
        if gpu.unavailable:
            st.warning("Not available: " + "; ".join(f"{figure}: {why}" for figure, why in gpu.unavailable.items()))
        if not gpu.processes:
            st.caption("No processes use this GPU.")
            continue
        st.dataframe(
            pd.DataFrame(
                {  # a table shows process names as plain text
                    "PID": [p.pid for p in gpu.processes],
                    "Process": [p.name or "(not visible here)" for p in gpu.processes],
                    "Kind": [p.kind for p in gpu.processes],
                    "GPU memory": [format_bytes(p.used_bytes) for p in gpu.processes],
                    "This process": [p.this_process for p in gpu.processes],
                }
            ),
            hide_index=True,
            key=f"gpu_{gpu.index}_processes",
        )


def show_remote_servers() -> None:
    """Each remote backend, with what its Prometheus /metrics says (vLLM, SGLang) when it serves one."""
    remotes = [(name, hub.get(name)) for name in hub.names() if not hub.is_local(name)]
    if engine is not None and not engine.capabilities.local_model:
        remotes.insert(0, (hub.local_name, engine))
    if not remotes:
        return
    st.header("Remote servers")
    st.caption(
        "Their GPUs and memory are measured on their own machines; what a server's /metrics tells is shown here."
    )
    for name, backend in remotes:
        card = backend.card()
        figures = backend.metrics()
        line = f"**{plain(name)}** · {plain(card.name)} at {plain(card.server or '')}"
        if figures is None:
            st.markdown(line)
            st.caption(
                "No metrics for this model: the server has no /metrics route (llama.cpp needs --metrics), "
                "reports none for this model, or cannot be reached."
            )
            continue
        parts = []
        if "kv_cache_usage" in figures:
            parts.append(f"KV cache {figures['kv_cache_usage'] * 100:.0f} % used")
        if "running" in figures:
            parts.append(f"{figures['running']:.0f} running")
        if "waiting" in figures:
            parts.append(f"{figures['waiting']:.0f} waiting")
        st.markdown(line)
        st.caption(" · ".join(parts) or "its /metrics has none of the figures shown here")


def show_history() -> None:
    points = monitor.history.points()
    if len(points) < 2:
        st.caption(f"Collecting samples every {monitor.interval_s:g} s …")
        return
    memory = [column for column in points[-1] if column == "host used" or column.endswith(("RSS", "memory used"))]
    utilization = [column for column in points[-1] if column.endswith("utilization")]
    left, right = st.columns(2) if utilization else (st.container(), None)
    left.vega_lite_chart(time_chart(points, memory, "memory (GiB)", monitor.history_s, scale=2**30), width="stretch")
    if utilization:
        right.vega_lite_chart(
            time_chart(points, utilization, "GPU utilization (%)", monitor.history_s), width="stretch"
        )


@st.fragment(run_every=monitor.interval_s)
def live_figures() -> None:
    sample = monitor.sample()
    st.header("GPUs")
    show_gpus(sample.nvml)
    if sample.allocator:
        st.subheader("PyTorch allocator of this process")
        st.dataframe(
            pd.DataFrame(
                {
                    "Device": [a["device"] for a in sample.allocator],
                    "Allocated": [format_bytes(a["allocated"]) for a in sample.allocator],
                    "Reserved": [format_bytes(a["reserved"]) for a in sample.allocator],
                    "Peak allocated": [format_bytes(a["peak_allocated"]) for a in sample.allocator],
                }
            ),
            hide_index=True,
            key="allocator",
        )

    st.header("Host")
    used, available, rss, peak = st.columns(4)
    used.metric(f"Host memory used of {format_bytes(sample.host['total'])}", format_bytes(sample.host["used"]))
    available.metric("Host memory available", format_bytes(sample.host["available"]))
    rss.metric("This process (RSS)", format_bytes(sample.process["current"]))
    peak.metric("This process, peak RSS", format_bytes(sample.process["peak"]))

    show_remote_servers()

    st.header(f"Last {monitor.history_s / 60:g} minutes")
    show_history()


live_figures()
