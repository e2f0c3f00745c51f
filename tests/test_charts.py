"""Charts over time: readable clock-time axes (glm_core.telemetry.charts, torch-free)."""

from glm_core.telemetry.charts import time_chart


def test_time_chart_spans_the_window_in_minutes():
    points = [
        {"time": 1_700_000_000 + 2 * i, "host used": 2**30 * (1 + i), "GPU 0 utilization": None} for i in range(3)
    ]
    chart = time_chart(points, ["host used", "GPU 0 utilization"], "memory (GiB)", 600, scale=2**30)
    assert [row["value"] for row in chart["data"]["values"]] == [1, 2, 3]  # GiB; missing figures left out
    assert chart["data"]["values"][0]["time"] == 1_700_000_000_000  # epoch ms: shown in the viewer's clock time
    x = chart["encoding"]["x"]
    assert x["scale"]["domain"] == [(1_700_000_004 - 600) * 1000, 1_700_000_004 * 1000]
    assert x["axis"]["format"] == "%H:%M" and x["axis"]["tickCount"] == {"interval": "minute", "step": 1}
    assert time_chart(points, ["host used"], "GiB", 3600)["encoding"]["x"]["axis"]["tickCount"]["step"] == 6
