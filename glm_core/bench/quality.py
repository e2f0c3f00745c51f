"""`bench quality`: what each precision level loses against a reference level on the same tokens, measured the way
llama.cpp's `llama-perplexity --kl-divergence` does: per token, the KL divergence of the level's next-token
distribution from the reference's, whether both put the same token first, and the perplexity of each.

The reference runs first: its log-probabilities are computed once per window and written to a scratch folder
(safetensors, one file per window, float32), and the reference model is released. Then each level is loaded
alone, run over the same windows and compared window by window against the stored reference, and released
before the next: one model in memory at a time, one window of logits at a time.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import torch

from ..protocol import ModelSpec
from ..settings import DEFAULT_GROUP_SIZE, EMBEDDED, load_settings
from .child import first_line
from .history import environment
from .quant import EVAL_TEXT, _windows
from .runs import BenchRun

DEFAULT_LEVELS = ("bf16", "int8", "int4")
DEFAULT_REFERENCE = "fp32"
MAX_TEXT_BYTES = 4 * 2**20  # an uploaded evaluation text; a few hundred thousand tokens, far more than a run reads
RUN_TIME_LIMIT_S = 60 * 60  # a run in the page's child process is stopped past it
DECODE_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle, with many details."

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class QualityBenchRequest:
    source: str = EMBEDDED  # a model folder, a .gguf file or "embedded": quality needs real weights
    levels: tuple[str, ...] = DEFAULT_LEVELS
    reference: str = DEFAULT_REFERENCE
    text_path: str | None = None  # a UTF-8 file; None: the bundled text
    text_name: str = "bundled"  # what the page shows: "bundled" or the uploaded file's name
    tokens: int = 1024
    window: int = 512
    device: str = "auto"
    group_size: int = DEFAULT_GROUP_SIZE
    decode_tokens: int = 32  # greedy tokens per level for its decode speed (0: not measured)

    def describe(self) -> dict:
        return asdict(self)


def read_text(path: str | None) -> str:
    """The evaluation text: the bundled one, or a user's UTF-8 file."""
    if path is None:
        return EVAL_TEXT.read_text(encoding="utf-8")
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None


@dataclass
class LevelScores:
    """Per-token figures of one level against the reference, gathered window by window."""

    kld: list[torch.Tensor]
    same_top1: int = 0
    nll: float = 0.0
    count: int = 0

    def summary(self, reference_ppl: float) -> dict:
        kld = torch.cat(self.kld).double() if self.kld else torch.zeros(1, dtype=torch.float64)
        ppl = math.exp(self.nll / self.count)
        return {
            "tokens": self.count,
            "kld_mean": kld.mean().item(),
            "kld_median": kld.median().item(),
            "kld_p99": torch.quantile(kld, 0.99).item(),
            "kld_max": kld.max().item(),
            "top1_agreement": self.same_top1 / self.count,
            "ppl": ppl,
            "ppl_ratio": ppl / reference_ppl,
        }


@torch.inference_mode()
def _window_logprobs(loaded, window_ids: list[int]) -> torch.Tensor:
    """log-softmax of the next-token logits at every input position of one window, float32 on the CPU.

    Every position goes through the layers' decode kernels, as each generated token does: our INT4 CPU kernel
    rounds the activations to int8 blocks, which the dense path a long prompt takes would hide (a level's loss
    here is what its replies see)."""
    from ..models import quant

    chunk = torch.tensor([window_ids[:-1]], device=loaded.device)
    dense_from = quant.OUR_INT4_DENSE_MIN_ROWS
    quant.OUR_INT4_DENSE_MIN_ROWS = sys.maxsize
    try:
        logits = loaded.model(input_ids=chunk).logits[0].float()
    finally:
        quant.OUR_INT4_DENSE_MIN_ROWS = dense_from
    return torch.log_softmax(logits, dim=-1).cpu()


def _nll(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    return -logprobs.gather(1, targets[:, None]).sum().item()


@torch.inference_mode()
def _decode_speed(loaded, tokens: int) -> float | None:
    """Greedy decode tokens/s after a short chat prompt (one stream, eager): the level's speed beside its loss."""
    from transformers import DynamicCache

    from ..engine.generation import decode_one, prefill

    if tokens <= 0:
        return None
    ids = loaded.chat_format.encode([{"role": "user", "content": DECODE_PROMPT}])
    cache = DynamicCache(config=loaded.model.config)
    token = int(prefill(loaded.model, ids, cache, loaded.device).argmax())
    token = int(decode_one(loaded.model, token, cache, loaded.device).argmax())  # warm-up step, not timed
    started = time.perf_counter()
    for _ in range(tokens):
        token = int(decode_one(loaded.model, token, cache, loaded.device).argmax())
    return tokens / (time.perf_counter() - started)


def split_level(level: str, group_size: int) -> tuple[str, int]:
    """ "int4-g128" -> ("int4", 128): a level may name its own INT4 group size, so group sizes compare side by side."""
    name, _, group = level.strip().lower().partition("-g")
    if group:
        if not group.isdigit() or int(group) < 1:
            raise ValueError(f"{level!r}: the group size after -g must be a whole number, e.g. int4-g128")
        return name, int(group)
    return name, group_size


def level_label(loaded, level: str) -> str:
    """The row's name: the level as loaded, with its group size where the level named one."""
    return loaded.precision.value + (f"-g{loaded.spec.group_size}" if "-g" in level else "")


def _load(request: QualityBenchRequest, level: str):
    from ..models.loading import load_model

    name, group_size = split_level(level, request.group_size)
    return load_model(ModelSpec(request.source, name, request.device, group_size=group_size))


def run_quality_bench(
    request: QualityBenchRequest,
    progress: Progress | None = None,
    scratch: Path | None = None,
    on_row: Callable[[str, str, dict], None] | None = None,
) -> dict:
    """The reference, then each level against it; returns {"model": ..., "reference": {...}, "levels": [...]}.

    A level that fails to load or run is reported with its error; the other levels still run. `on_row(part,
    model, row)` hears each row as it is done (part: "reference" or "level")."""
    progress = progress or (lambda _f, _m: None)
    on_row = on_row or (lambda _p, _m, _r: None)
    text = read_text(request.text_path)
    if request.tokens < 2:
        raise ValueError("--tokens must be at least 2")
    steps = len(request.levels) + 1
    with tempfile.TemporaryDirectory(prefix="glm-quality-", dir=scratch) as folder:
        progress(0.0, f"{request.reference.upper()} (reference): loading")
        reference = _load(request, request.reference)
        model_name = reference.name
        windows = _windows(reference, text, request.tokens, request.window)
        if not windows:
            raise ValueError("the text is too short: it needs at least 2 tokens")
        from safetensors.torch import load_file, save_file

        ref_nll, count = 0.0, 0
        for number, window_ids in enumerate(windows):
            progress(number / len(windows) / steps, f"{request.reference.upper()} (reference): window {number + 1}")
            logprobs = _window_logprobs(reference, window_ids)
            targets = torch.tensor(window_ids[1:])
            ref_nll += _nll(logprobs, targets)
            count += len(targets)
            save_file({"logprobs": logprobs.contiguous(), "targets": targets}, str(Path(folder) / f"{number}.st"))
        reference_row = {
            "level": level_label(reference, request.reference),
            "model": model_name,
            "device": str(reference.device),
            "tokens": count,
            "ppl": math.exp(ref_nll / count),
            "weights_bytes": reference.weights["total"],
            "decode_tokens_per_s": _decode_speed(reference, request.decode_tokens),
        }
        reference.release()
        del reference
        on_row("reference", model_name, reference_row)

        rows = []
        for step, level in enumerate(request.levels, start=1):
            label = level.upper()
            progress(step / steps, f"{label}: loading")
            try:
                loaded = _load(request, level)
            except Exception as exc:  # reported as this level's error
                rows.append({"level": level, "error": first_line(exc)})
                on_row("level", model_name, rows[-1])
                continue
            try:
                scores = LevelScores(kld=[])
                for number, window_ids in enumerate(windows):
                    progress((step + number / len(windows)) / steps, f"{label}: window {number + 1} of {len(windows)}")
                    stored = load_file(str(Path(folder) / f"{number}.st"))
                    ref_logprobs, targets = stored["logprobs"], stored["targets"]
                    logprobs = _window_logprobs(loaded, window_ids)
                    # KL(reference || level) per token: sum_v p_ref(v) * (log p_ref(v) - log p_level(v))
                    kld = torch.nn.functional.kl_div(logprobs, ref_logprobs, reduction="none", log_target=True)
                    scores.kld.append(kld.sum(-1))
                    scores.same_top1 += int((logprobs.argmax(-1) == ref_logprobs.argmax(-1)).sum())
                    scores.nll += _nll(logprobs, targets)
                    scores.count += len(targets)
                    del stored, ref_logprobs, logprobs, kld
                row = {"level": level_label(loaded, level), **scores.summary(reference_row["ppl"])}
                row["weights_bytes"] = loaded.weights["total"]
                row["decode_tokens_per_s"] = _decode_speed(loaded, request.decode_tokens)
                rows.append(row)
            except Exception as exc:
                rows.append({"level": level, "error": first_line(exc)})
            finally:
                loaded.release()
                del loaded
            on_row("level", model_name, rows[-1])
    progress(1.0, "done")
    return {"model": model_name, "reference": reference_row, "levels": rows}


def format_quality_report(result: dict) -> str:
    ref = result["reference"]
    lines = [
        f"bench quality: {result['model']} on {ref['device']}, {ref['tokens']} tokens against "
        f"{ref['level'].upper()} (perplexity {ref['ppl']:.3f})",
        "level      KLD mean   KLD p99    KLD max   top-1 agree  perplexity  ppl ratio  weights MiB  decode tok/s",
    ]
    for r in result["levels"]:
        if "error" in r:
            lines.append(f"{r['level']:<9}  error: {r['error']}")
            continue
        speed = f"{r['decode_tokens_per_s']:.1f}" if r.get("decode_tokens_per_s") else "-"
        lines.append(
            f"{r['level']:<9}  {r['kld_mean']:>8.5f}  {r['kld_p99']:>8.5f}  {r['kld_max']:>9.5f}  "
            f"{r['top1_agreement'] * 100:>10.2f}%  {r['ppl']:>10.3f}  {r['ppl_ratio']:>9.4f}  "
            f"{r['weights_bytes'] / 2**20:>11,.1f}  {speed:>12}"
        )
    return "\n".join(lines)


def run_in_child(request: QualityBenchRequest, progress: Progress, partial: Callable[[dict], None]) -> dict:
    """The child job (glm_core/bench/child.py): the whole run, each row sent as a partial item as it is done, so
    a child that dies later keeps the rows it had measured."""
    return run_quality_bench(
        request, progress, on_row=lambda part, model, row: partial({"part": part, "model": model, "row": row})
    )


# ---- the page's run: a child process with progress and cancel; the history and the CSV ----------------------


def store_text(data: bytes, data_dir: Path | None = None) -> str:
    """Keep an uploaded evaluation text (checked: UTF-8, at most MAX_TEXT_BYTES) under the data folder, named by
    its content; returns its path."""
    if len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"the text is {len(data) / 2**20:.1f} MiB; at most {MAX_TEXT_BYTES // 2**20} MiB")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    folder = Path(data_dir or load_settings().data_dir) / "quality-texts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.txt"
    if not path.is_file():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    return str(path)


@dataclass
class QualityBenchRun(BenchRun):
    """One quality benchmark: the reference and every level in one child process (one model loaded at a time).
    `result` is the child's; a child that dies or is cancelled leaves the rows it had sent, with the error."""

    kind: ClassVar[str] = "quality"
    request: QualityBenchRequest
    result: dict | None = None
    time_limit_s: float = RUN_TIME_LIMIT_S

    def execute(self) -> None:
        kept: dict = {"model": None, "reference": None, "levels": []}

        def on_progress(fraction: float, message: str) -> None:
            self.fraction, self.message = fraction, message

        def on_partial(item: dict) -> None:
            kept["model"] = item.get("model")
            if item.get("part") == "reference":
                kept["reference"] = item.get("row")
            else:
                kept["levels"].append(item.get("row"))

        outcome = self.run_child(self.request, on_progress, self.time_limit_s, on_partial)
        if outcome.error is None:
            self.result = outcome.result
            return
        if kept["reference"] is not None:
            self.result = kept
        if self.cancelled:
            return
        self.state, self.error = "failed", outcome.error.message
        measured = [r for r in kept["levels"] if "error" not in r]
        if measured:
            self.error += (
                f"; the {len(measured)} of {len(self.request.levels)} levels measured before "
                f"({', '.join(r['level'] for r in measured)}) are kept"
            )

    def measured(self) -> bool:
        return self.result is not None and any("error" not in r for r in self.result["levels"])

    def record(self) -> dict:
        return {
            "request": self.request.describe(),
            "result": self.result,
            "state": self.state,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "environment": self.environment,
        }


def command_line_record(request: QualityBenchRequest, result: dict, started_at: float) -> dict:
    """The history's record of a run made from the command line (the page's runs keep QualityBenchRun.record())."""
    return {
        "request": request.describe(),
        "result": result,
        "state": "done",
        "error": None,
        "started_at": started_at,
        "finished_at": time.time(),
        "environment": environment(request.device),
    }


QUALITY_CSV_FIELDS = (
    "run",
    "date",
    "model",
    "device",
    "device_name",
    "text",
    "tokens",
    "reference",
    "level",
    "error",
    "kld_mean",
    "kld_median",
    "kld_p99",
    "kld_max",
    "top1_agreement",
    "ppl",
    "ppl_ratio",
    "weights_bytes",
    "decode_tokens_per_s",
)


def quality_csv_rows(records: list[dict]) -> list[dict]:
    """One row per stored quality run and level (the reference too); text cells cannot run as formulas."""
    from ..conversations.exchange import spreadsheet_safe

    rows = []
    for record in records:
        request, result, env = record["request"], record.get("result") or {}, record.get("environment", {})
        date = datetime.fromtimestamp(record.get("finished_at") or record["started_at"], UTC).isoformat()
        reference = result.get("reference") or {}
        base = {
            "run": record.get("id", ""),
            "date": date,
            "model": result.get("model") or request["source"],
            "device": env.get("device", ""),
            "device_name": env.get("device_name", ""),
            "text": request.get("text_name", "bundled"),
            "tokens": reference.get("tokens"),
            "reference": reference.get("level") or request["reference"],
        }
        levels = [{**reference, "kld_mean": 0.0, "top1_agreement": 1.0, "ppl_ratio": 1.0}] if reference else []
        for level in levels + list(result.get("levels", [])):
            full = {**base, **{k: v for k, v in level.items() if k in QUALITY_CSV_FIELDS and k not in base}}
            full["level"] = level.get("level")
            rows.append({k: "" if full.get(k) is None else spreadsheet_safe(full.get(k)) for k in QUALITY_CSV_FIELDS})
    return rows
