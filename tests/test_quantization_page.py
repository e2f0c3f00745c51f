"""The Quantization page through Streamlit's AppTest: predictions before a run, a real run on a small
random-weight config, its comparison table, chart, history and CSV."""

import json

import pytest
from conftest import page_app
from streamlit.testing.v1 import AppTest
from test_bench_memory import MID_GLM

from ui.resources import get_bench_runner

PAGE = "Quantization"


@pytest.fixture
def page(data_dir):
    at = page_app(PAGE)
    at.run()
    assert not at.exception, at.exception
    return at


def table_with(at: AppTest, column: str):
    """The table that has `column` (AppTest does not keep the keys of dataframes)."""
    return next(df.value for df in at.dataframe if column in df.value.columns)


def test_preset_predictions_with_the_published_figures(page):
    assert page.radio(key="bench_choice").value.startswith("Architecture preset")
    assert page.selectbox(key="bench_preset").value == "chatglm2-6b"
    table = table_with(page, "Published encode (GB)")
    assert list(table["Level"]) == ["FP16", "INT8", "INT4"]
    assert table["Published encode (GB)"].round(1).tolist() == [13.1, 8.2, 5.5]
    assert table["Published generate (GB)"].round(1).tolist() == [12.8, 8.1, 5.1]
    assert (table["Encode 2048 (GB)"] < table["Published encode (GB)"] * 1.1).all()
    assert "No run yet" in " ".join(c.value for c in page.caption)
    page.selectbox(key="bench_preset").set_value("chatglm-6b").run()
    table = table_with(page, "Published encode (GB)")
    assert table["Published encode (GB)"].isna().all()  # published only for ChatGLM2-6B
    assert table["KV cache (KB/token)"][0] == pytest.approx(458.752)


def test_a_bad_path_is_explained(page, tmp_path):
    page.radio(key="bench_choice").set_value("A model folder or config.json").run()
    page.text_input(key="bench_path").input(str(tmp_path / "nowhere")).run()
    assert not page.exception
    assert "Cannot use this model" in " ".join(e.value for e in page.error)
    assert page.button(key="bench_run").disabled


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_run_shows_measured_predicted_and_history_with_csv(page, tmp_path, data_dir):
    config = tmp_path / "mid.json"
    config.write_text(json.dumps(MID_GLM))
    page.radio(key="bench_choice").set_value("A model folder or config.json").run()
    page.text_input(key="bench_path").input(str(config)).run()
    page.multiselect(key="bench_levels").set_value(["bf16"]).run()
    page.number_input(key="bench_encode").set_value(256).run()
    page.number_input(key="bench_generate").set_value(1024).run()
    page.selectbox(key="bench_device").set_value("cpu").run()
    page.button(key="bench_run").click().run()
    assert not page.exception, page.exception
    run = get_bench_runner().current
    assert run is not None and run.owner == page.session_state["workspace"]
    assert page.button(key="bench_run").disabled  # one run at a time
    run.wait(300)
    assert run.state == "done", run.results
    page.run()
    assert not page.exception, page.exception
    table = table_with(page, "Encode 256: measured (GB)")
    assert list(table["Level"]) == ["BF16"]
    measured, predicted = table["Encode 256: measured (GB)"][0], table["Encode 256: predicted (GB)"][0]
    assert measured > 0 and abs(predicted / measured - 1) < 0.10
    assert table["Encode 256: prediction error"][0].endswith("%")
    assert table["Perplexity"].isna().all()  # random weights
    assert "process's resident memory" in " ".join(c.value for c in page.caption)
    labels = page.selectbox(key="bench_history_choice").options
    assert len(labels) == 1 and "mid.json" in labels[0] and "BF16" in labels[0]
    assert page.get("download_button"), "the CSV download is offered"


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_quality_run_from_the_page_shows_loss_beside_cost(page, data_dir):
    """The quality section runs the embedded model's INT8 against FP32 on the bundled text in a child process;
    the run lands in the history with its table (KL divergence, agreement, weights, tokens/s) and CSV."""
    assert "No quality run yet" in " ".join(c.value for c in page.caption)
    page.multiselect(key="quality_levels").set_value(["int8"]).run()
    page.number_input(key="quality_tokens").set_value(64).run()
    page.button(key="quality_run").click().run()
    assert not page.exception, page.exception
    run = get_bench_runner().current
    assert run.kind == "quality" and run.owner == page.session_state["workspace"]
    assert page.button(key="quality_run").disabled and page.button(key="bench_run").disabled  # one at a time
    run.wait(600)
    assert run.state == "done", run.error
    page.run()
    assert not page.exception, page.exception
    table = table_with(page, "KLD mean")
    assert list(table["Level"]) == ["INT8"]
    assert table["KLD mean"][0] > 0 and 0 < table["Top-1 agreement (%)"][0] <= 100
    assert table["Weights (MiB)"][0] > 0 and table["Decode (tokens/s)"][0] > 0
    assert "against FP32" in " ".join(c.value for c in page.caption)
    assert any(b.label == "Download every quality run as CSV" for b in page.get("download_button"))


def test_moe_presets_show_the_experts_quantized_and_active_parameters(page):
    """GLM-4.5-Air and GLM-4.7-Flash: weights with the experts quantized (INT4 about a third of FP16, not 0.86x),
    MLA's compressed cache for the Flash, and the parameters in all and active per token."""
    page.selectbox(key="bench_preset").set_value("glm-4.5-air").run()
    assert not page.exception
    table = table_with(page, "Weights (GB)")
    assert table["Weights (GB)"][2] < 0.35 * table["Weights (GB)"][0]
    captions = " ".join(c.value for c in page.caption)
    assert "106.85 B parameters, 13.42 B active per token" in captions
    page.selectbox(key="bench_preset").set_value("glm-4.7-flash").run()
    table = table_with(page, "Weights (GB)")
    assert table["KV cache (KB/token)"][0] == pytest.approx(47 * 576 * 2 / 1e3)  # FP16: the latent and rotary key
    assert "29.94 B parameters, 3.90 B active per token" in " ".join(c.value for c in page.caption)
