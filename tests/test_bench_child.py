"""The benchmark child protocol (glm_core/bench/child.py): the request as JSON on the child's stdin, typed events
and errors back; a child that dies keeps what was measured before; a bad model path is a typed error; cancel
stops the child. The tests that start children load a model in each (tens of seconds): run this file alone."""

import io
import json
import os
import signal
import threading
import time

import pytest
import torch
from test_bench_memory import MID_GLM

from glm_core.bench.child import (
    JOBS,
    ChildProcess,
    ErrorKind,
    classify,
    decode_request,
    encode_request,
    run_child,
    serve,
)
from glm_core.bench.estimator import ConfigError
from glm_core.bench.history import BenchHistory
from glm_core.bench.memory import LevelReport, MemoryBenchRequest, MemoryBenchRun
from glm_core.bench.quality import QualityBenchRequest, QualityBenchRun
from glm_core.bench.quant import QuantLevelRequest
from glm_core.bench.runs import BenchRunner
from glm_core.protocol import ModelLoadError

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def mid_config(tmp_path):
    path = tmp_path / "mid-glm.json"
    path.write_text(json.dumps(MID_GLM))
    return path


def wait_for(condition, timeout=300, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- the request -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        MemoryBenchRequest("chatglm2-6b", ("bf16", "int4"), 600, 3000, "cpu", 64, 0, False, 12.5),
        QualityBenchRequest("/models/x", ("int8", "int4-g64"), "bf16", "/tmp/t.txt", "ours.txt", 64, 32, "cpu", 64, 0),
        QuantLevelRequest("/models/x", "int8", "cpu", 128, 4, 0, False, True, "chatglm3"),
    ],
    ids=["memory", "quality", "quant"],
)
def test_a_request_round_trips_through_json(request_):
    text = encode_request(request_)
    data = json.loads(text)  # plain JSON a person can read, with its job and protocol
    assert data["protocol"] == 1 and data["job"] in JOBS and isinstance(data["request"], dict)
    back = decode_request(text)
    assert back == request_ and type(back) is type(request_)
    assert isinstance(getattr(back, "levels", ()), tuple)  # JSON's lists come back as the declared tuples


def test_a_bad_request_is_refused_with_its_reason():
    good = json.loads(encode_request(MemoryBenchRequest("chatglm2-6b")))
    with pytest.raises(ValueError, match="not JSON"):
        decode_request("{")
    with pytest.raises(ValueError, match="protocol"):
        decode_request(json.dumps({**good, "protocol": 99}))
    with pytest.raises(ValueError, match="unknown benchmark job 'os'"):
        decode_request(json.dumps({**good, "job": "os"}))
    with pytest.raises(ValueError, match="no field shell"):
        decode_request(json.dumps({**good, "request": {**good["request"], "shell": "rm"}}))
    with pytest.raises(ValueError, match="not a benchmark request"):
        encode_request(object())
    # The child answers a bad request with a typed error line, not a traceback.
    out = io.StringIO()
    assert serve(io.StringIO('{"protocol": 1, "job": "memory", "request": {"levels": []}}'), out) == 2
    [line] = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "error" and event["kind"] == "bad_request" and "source" in event["message"]


def test_errors_carry_a_kind():
    assert classify(torch.OutOfMemoryError("CUDA out of memory")) is ErrorKind.OUT_OF_MEMORY
    assert classify(MemoryError()) is ErrorKind.OUT_OF_MEMORY
    assert classify(ModelLoadError("no such file or folder: /x")) is ErrorKind.BAD_MODEL
    assert classify(ConfigError("lacks num_layers")) is ErrorKind.BAD_MODEL
    assert classify(RuntimeError("boom")) is ErrorKind.FAILED


# ---- children ----------------------------------------------------------------------------------------------------


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_a_bad_model_path_comes_back_as_a_typed_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    outcome = run_child(MemoryBenchRequest(missing, ("bf16",), 16, 32, "cpu"), time_limit_s=120)
    assert outcome.result is None and outcome.error.kind is ErrorKind.BAD_MODEL
    assert "not a preset" in outcome.error.message and "\n" not in outcome.error.message
    outcome = run_child(QualityBenchRequest(missing, ("int8",), device="cpu", tokens=16), time_limit_s=120)
    assert outcome.error.kind is ErrorKind.BAD_MODEL and "no such file or folder" in outcome.error.message
    outcome = run_child(QuantLevelRequest(missing, "int8", "cpu"), time_limit_s=120)
    assert outcome.error.kind is ErrorKind.BAD_MODEL and "no such file or folder" in outcome.error.message


@pytest.mark.slow
def test_a_level_comes_back_as_a_typed_report(mid_config):
    progress = []
    outcome = run_child(
        MemoryBenchRequest(str(mid_config), ("fp32",), 64, 128, "cpu", eval_tokens=0),
        lambda fraction, message: progress.append((fraction, message)),
        time_limit_s=300,
    )
    assert outcome.error is None, outcome.error
    report = LevelReport.from_dict(outcome.result)
    assert report.level == "fp32" and report.weights == "random" and report.encode_tokens == 64
    assert report.generate_peak_bytes > report.weights_bytes > 0 and report.perplexity is None
    assert [m for _, m in progress][:2] == ["FP32: loading", "FP32: encoding 64 tokens"]
    assert [f for f, _ in progress] == sorted(f for f, _ in progress)


@pytest.mark.slow
def test_cancel_stops_the_child(mid_config):
    child = ChildProcess(MemoryBenchRequest(str(mid_config), ("fp32",), 8192, 8192, "cpu", eval_tokens=0)).start()
    messages = []
    outcome = {}
    reader = threading.Thread(
        target=lambda: outcome.update(done=child.read(lambda f, m: messages.append(m), time_limit_s=300))
    )
    reader.start()
    wait_for(lambda: any("encoding" in m for m in messages), what="the child to start encoding")
    started = time.monotonic()
    child.cancel()
    reader.join(30)
    assert not reader.is_alive() and time.monotonic() - started < 30
    assert child.poll() is not None  # the process is gone, not just forgotten
    assert outcome["done"].error.kind is ErrorKind.CANCELLED and outcome["done"].result is None


@pytest.mark.slow
def test_a_memory_child_killed_mid_run_keeps_the_levels_measured_before(mid_config, data_dir):
    """The kernel's OOM killer (or anyone) kills the second level's child while it encodes: the first level's
    figures stay, in the run and in the history; the second says it was killed, and where."""
    runner = BenchRunner(BenchHistory(data_dir))
    request = MemoryBenchRequest(str(mid_config), ("fp32", "bf16"), 1024, 1024, "cpu", eval_tokens=0)
    run = runner.start(request, owner="ws")
    assert isinstance(run, MemoryBenchRun)
    wait_for(lambda: run.results and "BF16: encoding" in run.message, what="the second level to encode")
    os.kill(run.child.process.pid, signal.SIGKILL)
    run.wait(60)
    assert run.state == "done" and not run.active
    measured, killed = run.results
    assert measured["level"] == "fp32" and "error" not in measured and measured["encode_peak_bytes"] > 0
    assert killed["level"] == "bf16" and killed["error_kind"] == "crashed"
    assert "killed (signal 9) during 'BF16: encoding 1024 tokens'" in killed["error"] and "\n" not in killed["error"]
    [stored] = BenchHistory(data_dir).list()
    assert stored["results"] == run.results


@pytest.mark.slow
def test_a_quality_child_killed_mid_run_keeps_the_levels_measured_before(data_dir):
    """One child runs the reference and every level: killed after INT8, the reference and INT8 are kept (sent
    as partial items when each was done), and the run's error says so in one line."""
    history = BenchHistory(data_dir)
    runner = BenchRunner(history)
    request = QualityBenchRequest(levels=("int8", "int4"), tokens=32, window=32, device="cpu", decode_tokens=0)
    run = runner.start(request, owner="ws")
    assert isinstance(run, QualityBenchRun)
    wait_for(lambda: run.message.startswith("INT4") or not run.active, what="the second level")
    assert run.active, run.error
    os.kill(run.child.process.pid, signal.SIGKILL)
    run.wait(60)
    assert run.state == "failed" and "killed (signal 9)" in run.error and "\n" not in run.error
    assert "the 1 of 2 levels measured before (int8) are kept" in run.error
    assert run.result["reference"]["level"] == "fp32" and [r["level"] for r in run.result["levels"]] == ["int8"]
    assert run.result["levels"][0]["kld_mean"] > 0
    [stored] = history.list_quality()
    assert stored["state"] == "failed" and stored["result"] == run.result
