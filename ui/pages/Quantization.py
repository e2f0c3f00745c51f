"""Quantization page: memory and speed per precision level, measured next to the estimator's prediction and the
published figures; every run kept as history and downloadable as CSV."""

from datetime import datetime

import pandas as pd
import streamlit as st

from glm_core import load_settings
from glm_core.access import (
    USER_BENCH_MAX_ENCODE,
    USER_BENCH_MAX_GENERATE,
    NotAllowed,
    PathNotAllowed,
    check_benchmark,
    check_model_path,
)
from glm_core.bench.estimator import GB, PRESETS, ConfigError, parameters_line
from glm_core.bench.memory import (
    CSV_FIELDS,
    LEVELS,
    MemoryBenchRequest,
    comparison_rows,
    csv_rows,
    device_type,
    predict,
)
from glm_core.safe_markdown import plain
from ui.access import admin_panel, current_workspace
from ui.quality_section import quality_section
from ui.resources import get_bench_runner, get_hub

st.set_page_config(page_title="Quantization", page_icon="⚖️", layout="wide")
workspace = current_workspace()
admin = admin_panel()
runner = get_bench_runner()
hub = get_hub()
engine = hub.engine
remote_names = [n for n in hub.names() if not hub.is_local(n)]
if engine is not None and not engine.capabilities.local_model:
    remote_names.insert(0, hub.local_name)
    engine = None  # a remote model in the local slot: nothing here to benchmark

st.title("Memory and speed per precision level")
st.caption(
    "Each level runs in a process of its own, at low CPU priority, so chats go on meanwhile. Encoding feeds the "
    "prompt through the engine's chunked prefill; generating holds a KV cache of the full length (filled with random "
    "keys and values: memory depends on shapes, not values) and decodes a few tokens for real. Presets and "
    "config.json files run with random weights; perplexity needs real weights. GB = 10⁹ bytes, as the published "
    "tables count."
)

if remote_names:
    st.info(
        f"Remote models ({plain(', '.join(remote_names))}) are not benchmarked here: their memory and precision "
        "are their server's, measured on it (vLLM: `--dtype`, `--quantization`, and its /metrics; the GPU monitor "
        "shows what those tell). This page runs presets and local model folders."
    )

# ---- what to run ---------------------------------------------------------------------------------------------

CHOICES = ["Architecture preset (random weights)", "The loaded model", "A model folder or config.json"]
# A folder on the server is an admin's choice: its errors would tell anyone which paths exist and what they hold.
choice = st.radio("Model", CHOICES if admin else CHOICES[:2], horizontal=True, key="bench_choice")
if choice == CHOICES[0]:
    source = st.selectbox("Preset", list(PRESETS), format_func=PRESETS.get, index=1, key="bench_preset")
elif choice == CHOICES[1]:
    source = engine.spec.path if engine is not None else None
    st.caption(f"Loaded: {plain(engine.card()['name'])} ({plain(source)})" if engine else "No model is loaded.")
else:
    source = st.text_input("Model folder (real weights) or config.json file (random weights)", key="bench_path").strip()
    try:
        source = check_model_path(source, load_settings().model_dirs) if source else source
    except PathNotAllowed as exc:
        st.error(str(exc))
        source = None
levels = st.multiselect("Levels", LEVELS, default=["fp16", "int8", "int4"], format_func=str.upper, key="bench_levels")
left, middle, right = st.columns(3)
max_encode, max_generate = (131072, 131072) if admin else (USER_BENCH_MAX_ENCODE, USER_BENCH_MAX_GENERATE)
encode = left.number_input("Prompt tokens to encode", 1, max_encode, 2048, step=256, key="bench_encode")
generate = middle.number_input(
    "Context to generate up to (tokens)", 1, max_generate, 8192, step=1024, key="bench_generate"
)
if not admin:
    st.caption(
        f"Runs up to {USER_BENCH_MAX_ENCODE:,} prompt tokens and a {USER_BENCH_MAX_GENERATE:,}-token context; "
        "larger ones, and model folders on the server, are for admins."
    )
device = right.selectbox("Device", ["auto", "cpu", "cuda"], key="bench_device")
try:
    measured_on = device_type(device)
except ValueError as exc:
    st.error(str(exc))
    st.stop()
if measured_on == "cpu":
    st.info(
        "On this CPU the memory is the benchmark process's resident memory (RSS), Python runtime included. "
        "Long prompts take minutes per level on a CPU; a run can be cancelled."
    )

request = None
if source and levels:
    group_size = engine.spec.group_size if choice == CHOICES[1] else load_settings().group_size
    request = MemoryBenchRequest(source, tuple(levels), int(encode), int(generate), device, group_size)
    try:
        predicted = predict(request)
    except (ConfigError, ValueError, OSError) as exc:
        st.error(f"Cannot use this model: {exc}")
        request = None
    else:
        st.subheader("Predicted from config.json")
        if predicted:
            st.caption(parameters_line(predicted[0]["parameters"], predicted[0]["active_parameters"]))
        st.dataframe(
            pd.DataFrame(
                {
                    "Level": [p["level"].upper() for p in predicted],
                    "Weights (GB)": [p["weights_bytes"] / GB for p in predicted],
                    "KV cache (KB/token)": [p["kv_bytes_per_token"] / 1e3 for p in predicted],
                    f"Encode {encode} (GB)": [p["encode_peak_bytes"] / GB for p in predicted],
                    f"Generate {generate} (GB)": [p["generate_peak_bytes"] / GB for p in predicted],
                    "Published encode (GB)": [(p["encode_published_bytes"] or float("nan")) / GB for p in predicted],
                    "Published generate (GB)": [
                        (p["generate_published_bytes"] or float("nan")) / GB for p in predicted
                    ],
                }
            ),
            hide_index=True,
            key="predicted_table",
            column_config={
                **{
                    c: st.column_config.NumberColumn(format="%.2f")
                    for c in ("Weights (GB)", f"Encode {encode} (GB)", f"Generate {generate} (GB)")
                },
                "KV cache (KB/token)": st.column_config.NumberColumn(format="%.1f"),
            },
        )

current = runner.current
busy = current is not None and current.active
if st.button(
    "Run the benchmark",
    type="primary",
    key="bench_run",
    disabled=request is None or busy,
    help="A run is in progress on this server" if busy else None,
):
    try:
        check_benchmark(
            request.source,
            request.encode,
            request.generate,
            admin=admin,
            presets=PRESETS,
            loaded_path=engine.spec.path if engine is not None else None,
        )
        runner.start(request, owner=workspace)
    except (RuntimeError, ConfigError, NotAllowed) as exc:
        st.error(str(exc))
    else:
        st.rerun()


# ---- the run in progress -------------------------------------------------------------------------------------


def show_comparison(record: dict, key: str) -> None:
    rows = comparison_rows(record)
    failed = [r for r in rows if r["error"]]
    for r in failed:
        st.warning(f"{r['level'].upper()}: {r['error']}")
    rows = [r for r in rows if not r["error"]]
    if not rows:
        return

    def pct(value):
        return f"{value * 100:+.1f} %" if value is not None else ""

    table = {"Level": [r["level"].upper() for r in rows], "Weights (GB)": [r["weights_bytes"] / GB for r in rows]}
    for phase, tokens in (("encode", record["request"]["encode"]), ("generate", record["request"]["generate"])):
        label = f"{phase.capitalize()} {tokens}"
        table[f"{label}: measured (GB)"] = [r[f"{phase}_measured_bytes"] / GB for r in rows]
        table[f"{label}: predicted (GB)"] = [(r[f"{phase}_predicted_bytes"] or float("nan")) / GB for r in rows]
        table[f"{label}: prediction error"] = [pct(r[f"{phase}_prediction_error"]) for r in rows]
        table[f"{label}: published (GB)"] = [(r[f"{phase}_published_bytes"] or float("nan")) / GB for r in rows]
        table[f"{label}: ours vs published"] = [pct(r[f"{phase}_vs_published"]) for r in rows]
    table["TTFT (s)"] = [r["ttft_s"] for r in rows]
    table["Decode (tokens/s)"] = [r["decode_tokens_per_s"] for r in rows]
    table["Perplexity"] = [r["perplexity"] for r in rows]
    frame = pd.DataFrame(table)
    frame = frame.drop(
        columns=[
            c
            for c in frame.columns
            if "published" in c
            and not any(  # nothing to compare with
                r[f"{phase}_published_bytes"] for r in rows for phase in ("encode", "generate")
            )
        ]
    )
    st.dataframe(
        frame,
        hide_index=True,
        key=f"{key}_table",
        column_config={
            c: st.column_config.NumberColumn(format="%.2f") for c in frame.columns if c.endswith(("(GB)", "(s)", "/s)"))
        },
    )

    charts = st.columns(2)
    for column, phase in zip(charts, ("encode", "generate")):
        long = pd.DataFrame(
            [
                {"level": r["level"].upper(), "figure": figure, "GB": r[f"{phase}_{figure}_bytes"] / GB}
                for r in rows
                for figure in ("measured", "predicted", "published")
                if r[f"{phase}_{figure}_bytes"]
            ]
        )
        column.caption(
            f"Peak while {'encoding' if phase == 'encode' else 'generating'} {record['request'][phase]} tokens (GB)"
        )
        column.bar_chart(long, x="level", y="GB", color="figure", stack=False, sort=False)


@st.fragment(run_every=1.0)
def run_in_progress() -> None:
    run = runner.current
    if run is None:
        return
    if not run.active:
        if st.session_state.get("watching") == id(run):  # it just finished: redraw the page with the history
            del st.session_state["watching"]
            st.rerun(scope="app")
        return
    st.session_state.watching = id(run)
    st.subheader(f"Running: {plain(run.request.source)}")
    st.progress(min(run.fraction, 1.0), text=plain(run.message))
    if run.owner == workspace:
        st.button("Cancel the run", key="bench_cancel", on_click=run.cancel)
    else:
        st.caption("Started from another workspace: only it can cancel.")
    if run.kind == "memory" and run.results:
        show_comparison(run.record(), "running")


run_in_progress()
quality_section(runner, engine, workspace, admin)

# ---- results and history -------------------------------------------------------------------------------------

st.header("Memory runs")
history = runner.history.list()
if not history:
    st.caption("No run yet.")
    st.stop()


def run_label(record: dict) -> str:
    when = datetime.fromtimestamp(record.get("finished_at") or record["started_at"]).strftime("%Y-%m-%d %H:%M")
    request, env = record["request"], record.get("environment", {})
    levels = ", ".join(level.upper() for level in request["levels"])
    return (
        f"#{record['id']} · {when} · {request['source']} · {levels} · encode {request['encode']} / "
        f"generate {request['generate']} · {env.get('device_name', env.get('device', '?'))}"
        + (f" · {record['state']}" if record.get("state") != "done" else "")
    )


by_id = {record["id"]: record for record in history}
chosen = by_id[st.selectbox("Run", list(by_id), format_func=lambda i: run_label(by_id[i]), key="bench_history_choice")]
environment = chosen.get("environment", {})
st.caption(
    f"Measured on {plain(environment.get('device_name', '?'))} ({plain(environment.get('device', '?'))}) with "
    f"torch {plain(environment.get('torch', '?'))}, transformers {plain(environment.get('transformers', '?'))}, "
    f"Python {plain(environment.get('python', '?'))}. Memory: "
    + (
        "the benchmark process's resident memory (RSS)."
        if environment.get("device") == "cpu"
        else "the CUDA allocator's reserved peak plus the CUDA context (what nvidia-smi shows)."
    )
)
show_comparison(chosen, "chosen")

frame = pd.DataFrame(csv_rows(history), columns=list(CSV_FIELDS))
st.download_button(
    "Download every run as CSV",
    frame.to_csv(index=False).encode("utf-8"),
    file_name="glm-memory-benchmarks.csv",
    mime="text/csv",
    key="bench_csv",
)
