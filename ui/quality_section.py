"""The Quantization page's quality section: what each level loses against a reference level (KL divergence, top-1
agreement, perplexity) beside what it costs (weights, tokens/s); runs in a child process (glm_core/bench/quality.py)
and is kept in the team's history with the memory runs."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from glm_core import load_settings
from glm_core.access import PathNotAllowed, check_model_path
from glm_core.bench.quality import (
    DEFAULT_LEVELS,
    QUALITY_CSV_FIELDS,
    QualityBenchRequest,
    quality_csv_rows,
    store_text,
)
from glm_core.bench.runs import BenchRunner
from glm_core.protocol import Backend
from glm_core.safe_markdown import plain

LEVELS = ["fp32", "bf16", "fp16", "int8", "int4"]
USER_MAX_TOKENS = 2048  # a larger text is an admin's run: minutes of CPU per level


def quality_section(runner: BenchRunner, engine: Backend | None, workspace: str, admin: bool) -> None:
    st.header("Quality per level")
    st.caption(
        "What a level loses, on your text, against a reference level: the mean and 99th percentile of the KL "
        "divergence between their next-token distributions, how often both put the same token first, and the "
        "perplexity of each (as llama.cpp's `llama-perplexity --kl-divergence` reports). One model is loaded at a "
        "time; the reference's log-probabilities are computed once and kept on disk. Needs real weights."
    )
    sources = {"The embedded model (SmolLM2-135M)": "embedded"}
    if engine is not None and engine.capabilities.local_model and engine.spec.path != "embedded":
        sources[f"The loaded model ({engine.card()['name']})"] = engine.spec.path
    if admin:
        sources["A model folder"] = ""
    label = st.radio("Model", list(sources), horizontal=True, key="quality_source", format_func=plain)
    source = sources[label]
    if label == "A model folder":
        source = st.text_input("Model folder", key="quality_path").strip()
        try:
            source = check_model_path(source, load_settings().model_dirs) if source else source
        except PathNotAllowed as exc:
            st.error(str(exc))
            source = ""
    left, middle, right = st.columns(3)
    levels = left.multiselect(
        "Levels", LEVELS, default=list(DEFAULT_LEVELS), format_func=str.upper, key="quality_levels"
    )
    reference = middle.selectbox("Reference", LEVELS, format_func=str.upper, key="quality_reference")
    tokens = right.number_input(
        "Tokens of the text", 16, 131072 if admin else USER_MAX_TOKENS, 1024, step=256, key="quality_tokens"
    )
    text = st.radio(
        "Text", ["Bundled (a story, 899 tokens)", "Upload a UTF-8 file"], horizontal=True, key="quality_text"
    )
    upload = (
        st.file_uploader("Text file", type=["txt", "md"], key="quality_upload")
        if text != "Bundled (a story, 899 tokens)"
        else None
    )

    busy = runner.current is not None and runner.current.active
    ready = bool(source and levels) and (upload is not None or text.startswith("Bundled"))
    if st.button("Measure quality", type="primary", key="quality_run", disabled=not ready or busy):
        try:
            text_path = store_text(upload.getvalue()) if upload is not None else None
            request = QualityBenchRequest(
                source=source,
                levels=tuple(levels),
                reference=reference,
                text_path=text_path,
                text_name=upload.name if upload is not None else "bundled",
                tokens=int(tokens),
                group_size=engine.spec.group_size
                if engine is not None and source == engine.spec.path
                else load_settings().group_size,
            )
            runner.start(request, owner=workspace)
        except (RuntimeError, ValueError) as exc:
            st.error(plain(exc))
        else:
            st.rerun()

    history = runner.history.list_quality()
    if not history:
        st.caption("No quality run yet.")
        return
    by_id = {record["id"]: record for record in history}
    chosen = by_id[
        st.selectbox("Quality run", list(by_id), format_func=lambda i: _label(by_id[i]), key="quality_history_choice")
    ]
    show_quality(chosen)
    frame = pd.DataFrame(quality_csv_rows(history), columns=list(QUALITY_CSV_FIELDS))
    st.download_button(
        "Download every quality run as CSV",
        frame.to_csv(index=False).encode("utf-8"),
        file_name="glm-quality-benchmarks.csv",
        mime="text/csv",
        key="quality_csv",
    )


def _label(record: dict) -> str:
    when = datetime.fromtimestamp(record.get("finished_at") or record["started_at"]).strftime("%Y-%m-%d %H:%M")
    request, result = record["request"], record.get("result") or {}
    text = request.get("text_name") or "bundled"
    return (
        f"#{record['id']} · {when} · {result.get('model', Path(request['source']).name)} · "
        f"{', '.join(level.upper() for level in request['levels'])} vs {request['reference'].upper()} · {text}"
    )


def show_quality(record: dict) -> None:
    """The table and the charts of one run: quality beside cost per level."""
    result = record["result"]
    reference = result["reference"]
    rows = [r for r in result["levels"] if "error" not in r]
    for failed in (r for r in result["levels"] if "error" in r):
        st.warning(f"{failed['level'].upper()}: {plain(failed['error'])}")
    st.caption(
        f"{plain(result['model'])}, {reference['tokens']} tokens of {plain(record['request'].get('text_name') or 'bundled')}, "
        f"against {reference['level'].upper()} (perplexity {reference['ppl']:.3f}, "
        f"{reference['weights_bytes'] / 2**20:,.0f} MiB of weights)."
    )
    if not rows:
        return
    frame = pd.DataFrame(
        {
            "Level": [r["level"].upper() for r in rows],
            "KLD mean": [r["kld_mean"] for r in rows],
            "KLD p99": [r["kld_p99"] for r in rows],
            "Top-1 agreement (%)": [r["top1_agreement"] * 100 for r in rows],
            "Perplexity": [r["ppl"] for r in rows],
            "Perplexity ratio": [r["ppl_ratio"] for r in rows],
            "Weights (MiB)": [r["weights_bytes"] / 2**20 for r in rows],
            "Decode (tokens/s)": [r.get("decode_tokens_per_s") for r in rows],
        }
    )
    st.dataframe(
        frame,
        hide_index=True,
        key=f"quality_table_{record['id']}",
        column_config={
            "KLD mean": st.column_config.NumberColumn(format="%.5f"),
            "KLD p99": st.column_config.NumberColumn(format="%.5f"),
            "Top-1 agreement (%)": st.column_config.NumberColumn(format="%.2f"),
            "Perplexity": st.column_config.NumberColumn(format="%.3f"),
            "Perplexity ratio": st.column_config.NumberColumn(format="%.4f"),
            "Weights (MiB)": st.column_config.NumberColumn(format="%.1f"),
            "Decode (tokens/s)": st.column_config.NumberColumn(format="%.1f"),
        },
    )
    left, right = st.columns(2)
    left.caption("KL divergence (mean) against the weights each level holds")
    left.scatter_chart(frame, x="Weights (MiB)", y="KLD mean", color="Level", size=120)
    right.caption("Top-1 agreement against decode speed")
    right.scatter_chart(frame, x="Decode (tokens/s)", y="Top-1 agreement (%)", color="Level", size=120)
