"""The GPU monitor page through Streamlit's AppTest, with a fake NVML module injected through
glm_core.telemetry.gpu_monitor.default_nvml (the page's process-wide monitor is rebuilt around it)."""

import json
import os

import pynvml
import pytest
from conftest import ROOT, page_app
from fake_nvml import FakeNvml, two_busy_gpus
from streamlit.testing.v1 import AppTest

from glm_core import ModelSpec
from glm_core.safe_markdown import plain
from glm_core.telemetry import gpu_monitor
from ui.resources import get_hub, get_monitor

MONITOR = "GPU_monitor"
HOME = str(ROOT / "Home.py")


@pytest.fixture
def nvml(monkeypatch):
    """install(fake): the page's monitor reads `fake` from its next run on."""

    def install(fake):
        monkeypatch.setattr(gpu_monitor, "default_nvml", lambda: fake)
        get_monitor.clear()  # stops the old sampler thread (on_release)
        return fake

    yield install
    get_monitor.clear()


def open_monitor(secrets=None) -> AppTest:
    at = page_app(MONITOR, timeout=60)
    if secrets is not None:
        at.secrets = secrets
    at.run()
    assert not at.exception, at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def texts(elements) -> str:
    return " ".join(e.value for e in elements)


def test_each_gpu_with_its_figures_and_processes(nvml):
    nvml(two_busy_gpus())
    at = open_monitor()
    assert [s.value for s in at.subheader] == ["GPU 0 · NVIDIA H100 80GB HBM3", "GPU 1 · NVIDIA A10"]
    shown = [(m.label, m.value) for m in at.metric]
    assert shown[:4] == [
        ("Memory used of 80.0 GiB", "20.0 GiB"),
        ("Utilization", "37 %"),
        ("Temperature", "51 °C"),
        ("Power (limit 700 W)", "312 W"),
    ]
    assert shown[4:8] == [
        ("Memory used of 24.0 GiB", "3.00 GiB"),
        ("Utilization", "0 %"),
        ("Temperature", "33 °C"),
        ("Power (limit 150 W)", "21 W"),
    ]
    first = at.dataframe[0].value
    assert list(first.columns) == ["PID", "Process", "Kind", "GPU memory", "This process"]
    assert list(first["GPU memory"]) == ["12.0 GiB", "n/a"] and list(first["This process"]) == [False, True]
    assert first["PID"][1] == os.getpid() and first["Process"][0] == "(not visible here)"
    assert list(at.dataframe[1].value["Kind"]) == ["graphics"]
    assert any(label.startswith("Host memory used of ") for label in metrics(at)) and not at.error and not at.warning


def test_without_a_gpu_the_page_says_so_and_shows_host_memory(nvml):
    nvml(FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound()))
    at = open_monitor()
    assert "No NVIDIA GPU found: NVML Shared Library Not Found" in texts(at.info)
    shown = metrics(at)
    host = next(label for label in shown if label.startswith("Host memory used of "))
    assert shown[host].endswith(("MiB", "GiB")) and shown["This process (RSS)"].endswith(("MiB", "GiB"))
    assert "This process, peak RSS" in shown and "Host memory available" in shown
    assert not at.subheader and not at.dataframe


def test_nvml_errors_are_messages_and_the_rest_stays(nvml):
    fake = nvml(two_busy_gpus())
    fake.gpus[0].failing["nvmlDeviceGetUtilizationRates"] = pynvml.NVMLError_GpuIsLost()
    fake.gpus[1].failing["nvmlDeviceGetPowerUsage"] = pynvml.NVMLError_NotSupported()
    at = open_monitor()
    assert "GPU 0 could not be read: GPU is lost" in texts(at.error)
    assert "power: Not Supported" in texts(at.warning)
    assert metrics(at)["Power (limit 150 W)"] == "n/a" and metrics(at)["Memory used of 24.0 GiB"] == "3.00 GiB"


def test_history_charts_once_samples_are_there(nvml):
    nvml(two_busy_gpus())
    monitor = get_monitor()
    for _ in range(3):
        monitor.record()
    at = open_monitor()
    charts = [json.loads(chart.proto.spec) for chart in at.get("vega_lite_chart")]
    assert len(charts) == 2  # memory, and GPU utilization
    assert "Collecting samples" not in texts(at.caption)
    for chart in charts:  # clock time over the whole window, labelled by minute
        x = chart["encoding"]["x"]
        assert x["axis"]["format"] == "%H:%M" and x["axis"]["tickCount"]["interval"] == "minute"
        assert x["scale"]["domain"][1] - x["scale"]["domain"][0] == monitor.history_s * 1000


def test_free_cached_memory_reports_what_it_freed(nvml):
    nvml(FakeNvml(init_error=pynvml.NVMLError_DriverNotLoaded()))
    at = open_monitor()
    at.button(key="free_memory").click().run()
    assert not at.exception
    assert texts(at.success).startswith("Freed cached memory: process RSS ")


def test_access_password_hides_the_page(nvml):
    nvml(two_busy_gpus())
    at = open_monitor(secrets={"access_password": "s3cret"})
    assert not at.metric and not at.subheader and at.text_input(key="access_password_input")


@pytest.fixture
def tiny_in_hub(env_cleanup, tiny_model_dir):
    """The tiny model loaded in the shared hub and configured as the default; handed back afterwards."""
    hub = get_hub()
    hub.unload()
    env_cleanup.setenv("GLM_MODEL_PATH", str(tiny_model_dir))
    env_cleanup.setenv("GLM_PRECISION", "fp32")
    hub.load(ModelSpec(str(tiny_model_dir), "fp32", "cpu"))
    yield hub
    hub.unload()


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_unload_asks_first_and_the_chat_page_loads_the_model_again(nvml, tiny_in_hub):
    nvml(FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound()))
    hub = tiny_in_hub
    at = open_monitor()
    name = plain(hub.engine.card().name)  # a folder's name, so Markdown-escaped
    assert f"{name} · FP32 · cpu" in texts(at.markdown)

    at.button(key="unload_model").click().run()
    assert "will be unloaded for every user" in texts(at.markdown)  # the confirmation dialog
    at.button(key="cancel_unload").click().run()
    assert hub.engine is not None and not any(b.key == "confirm_unload" for b in at.button)

    at.button(key="unload_model").click().run()
    at.button(key="confirm_unload").click().run()
    assert not at.exception and hub.engine is None
    assert texts(at.success).startswith(f"Unloaded {name}: process RSS ")
    assert "No model is loaded" in texts(at.info) and at.button(key="unload_model").disabled

    home = AppTest.from_file(HOME, default_timeout=120)
    home.run()
    assert not home.exception and hub.engine is not None  # the chat page loaded the default model again
    assert home.chat_input[0].disabled is False
