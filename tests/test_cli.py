"""`python -m glm_core chat` and `bench turns` as a user runs them."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def run_cli(*args, stdin="", timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "glm_core", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_piped_chat_prints_one_json_line_per_turn():
    result = run_cli("chat", "--temperature", "0", "--max-new-tokens", "40", "--precision", "fp32",
                     stdin="What is the capital of France?\n\nAnd of Germany?\n")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2  # the empty line was skipped
    first, second = lines
    assert set(first) == {"prompt", "reply", "prompt_tokens", "completion_tokens", "ttft_s", "tokens_per_s", "stopped"}
    assert "Paris" in first["reply"] and first["stopped"] is False
    assert "Berlin" in second["reply"]
    # Consecutive turns of one conversation: the second prompt saw the first exchange.
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]


def test_bad_model_path_is_a_clear_cli_error(tmp_path):
    result = run_cli("chat", "--model", str(tmp_path / "nowhere"), stdin="hi\n")
    assert result.returncode == 2
    assert "error: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_turns_json_has_the_promised_fields(tiny_model_dir):
    result = run_cli("bench", "turns", "--model", str(tiny_model_dir), "--precision", "fp32",
                     "--max-new-tokens", "4", "--decode-tokens", "16", "--repeats", "1", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert len(figures["ttft_reuse_s"]) == len(figures["ttft_recompute_s"]) == 10
    assert figures["engine_tokens_per_s"] > 0 and figures["generate_tokens_per_s"] > 0
    assert figures["context_tokens"] == sorted(figures["context_tokens"])
    # With the kept cache only the new turn is prefilled.
    assert max(figures["prefill_tokens_reuse"][1:]) < figures["context_tokens"][-1] / 3


def test_bench_quant_json_has_the_promised_fields(tiny_model_dir):
    result = run_cli("bench", "quant", "--model", str(tiny_model_dir), "--levels", "bf16,int8,int4",
                     "--decode-tokens", "4", "--eval-tokens", "64", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["level"] for r in rows] == ["bf16", "int8", "int4"]
    for row in rows:
        for key in ("weights_bytes", "peak_bytes", "ttft_s", "decode_tokens_per_s", "perplexity"):
            assert row[key] is not None and row[key] > 0, (key, row)
    assert rows[2]["weights_bytes"] < rows[1]["weights_bytes"] < rows[0]["weights_bytes"]


def test_bench_quant_reports_a_level_that_fails(tiny_model_dir):
    result = run_cli("bench", "quant", "--model", str(tiny_model_dir), "--levels", "bf16,fp8", "--json")
    rows = json.loads(result.stdout)
    assert result.returncode == 1 and "unknown precision" in rows[1]["error"]
