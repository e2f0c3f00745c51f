"""Vega-Lite specs for charts over time (torch-free; the pages hand them to st.vega_lite_chart).

Streamlit's line_chart labels a datetime axis by whatever unit its ticks fall on, so ten minutes of samples read
".900", ":51", "08:14". Here the x axis is always the whole window (the last ten minutes, say) in the viewer's
clock time, one labelled tick per minute, HH:MM; the tooltip gives the second.
"""

from __future__ import annotations


def time_chart(
    points: list[dict], columns: list[str], y_title: str, window_s: float, scale: float = 1.0, end: float | None = None
) -> dict:
    """A line per column of `points` ({"time": epoch seconds, column: value, ...}), values divided by `scale`,
    over the `window_s` seconds up to `end` (default: the newest point)."""
    rows = [
        {"time": p["time"] * 1000, "series": column, "value": p[column] / scale}
        for p in points
        for column in columns
        if p.get(column) is not None
    ]
    end = end if end is not None else max((p["time"] for p in points), default=0.0)
    minute_step = max(1, round(window_s / 60 / 10))  # at most about ten labels
    return {
        "data": {"values": rows},
        "mark": {"type": "line", "interpolate": "monotone"},
        "encoding": {
            "x": {
                "field": "time",
                "type": "temporal",
                "title": None,
                "scale": {"domain": [(end - window_s) * 1000, end * 1000]},
                "axis": {
                    "format": "%H:%M",
                    "labelAngle": 0,
                    "labelOverlap": True,
                    "tickCount": {"interval": "minute", "step": minute_step},
                },
            },
            "y": {"field": "value", "type": "quantitative", "title": y_title},
            "color": {"field": "series", "type": "nominal", "title": None, "legend": {"orient": "bottom"}},
            "tooltip": [
                {"field": "time", "type": "temporal", "format": "%H:%M:%S", "title": "time"},
                {"field": "series", "type": "nominal", "title": "series"},
                {"field": "value", "type": "quantitative", "format": ".2f", "title": y_title},
            ],
        },
    }
