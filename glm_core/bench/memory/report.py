"""The memory benchmark's report: one level's typed figures, and each run compared with the estimator's
prediction and the published tables (text, rows for the page, CSV)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC

from ...models.precision import resolve_device
from ..estimator import estimate, published
from .request import MemoryBenchRequest, source_config


@dataclass(frozen=True)
class LevelReport:
    """What a level's child measured (bytes, seconds); a stored run keeps it as a dict (`to_dict`)."""

    level: str
    model: str
    weights: str  # "real" or "random"
    device: str
    memory_source: str  # "process RSS" or the CUDA allocator's reserved bytes plus the CUDA context
    runtime_bytes: int  # held before loading (the Python runtime on a CPU; the CUDA context on a GPU)
    weights_bytes: int
    quantized_weights_bytes: int
    kv_bytes_per_token: int
    load_s: float
    load_peak_bytes: int
    encode_tokens: int
    encode_peak_bytes: int
    ttft_s: float
    generate_tokens: int
    generate_peak_bytes: int
    decode_tokens_per_s: float | None
    perplexity: float | None  # real weights only

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LevelReport:
        """A child's result back as a report (ValueError names what is missing)."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"the level's result lacks {', '.join(missing)}")
        return cls(**{name: data[name] for name in names})


@dataclass(frozen=True)
class LevelError:
    """A level that gave no report: why, and the kind of failure (glm_core.bench.child.ErrorKind's values, or
    "not_run" for a level refused before it started)."""

    level: str
    error: str
    error_kind: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def comparison_rows(data: dict) -> list[dict]:
    """One row per level of a run record: measured, predicted (with the error) and published (ours vs theirs)."""
    request = data["request"]
    source_key = request["source"].strip().lower()
    table = published(source_key, request["encode"], request["generate"]) or {}
    rows = []
    for result in data["results"]:
        level = result["level"]
        predicted = data["estimates"].get(level, {})
        row = {"level": level, "error": result.get("error")}
        for phase in ("encode", "generate"):
            measured = result.get(f"{phase}_peak_bytes")
            guess = predicted.get(f"{phase}_peak_bytes")
            theirs = table.get(level, (None, None))[0 if phase == "encode" else 1]
            row[f"{phase}_measured_bytes"] = measured
            row[f"{phase}_predicted_bytes"] = guess
            row[f"{phase}_prediction_error"] = (guess - measured) / measured if measured and guess else None
            row[f"{phase}_published_bytes"] = theirs
            row[f"{phase}_vs_published"] = (measured - theirs) / theirs if measured and theirs else None
        for key in ("weights_bytes", "ttft_s", "decode_tokens_per_s", "perplexity", "weights"):
            row[key] = result.get(key)
        row["predicted_weights_bytes"] = predicted.get("weights_bytes")
        rows.append(row)
    return rows


def format_memory_report(record: dict) -> str:
    request, env = record["request"], record.get("environment", {})
    lines = [
        f"bench memory: {request['source']} on {env.get('device_name', request['device'])}, "
        f"encode {request['encode']} / generate {request['generate']} tokens (GB = 10^9 bytes)",
        "level  weights GB  encode: measured  predicted (err)   published   generate: measured  predicted (err)"
        "   published   ttft s  decode tok/s  perplexity",
    ]

    def gb(value):
        return f"{value / 1e9:.2f}" if value else "-"

    def pct(value):
        return f"{value * 100:+.1f}%" if value is not None else ""

    for row in comparison_rows(record):
        if row["error"]:
            lines.append(f"{row['level']:<5}  error: {row['error']}")
            continue
        ppl = f"{row['perplexity']:.2f}" if row["perplexity"] is not None else "n/a"
        lines.append(
            f"{row['level']:<5}  {gb(row['weights_bytes']):>10}  "
            f"{gb(row['encode_measured_bytes']):>16}  {gb(row['encode_predicted_bytes']):>9} ({pct(row['encode_prediction_error']):>6})"
            f"  {gb(row['encode_published_bytes']):>9}  "
            f"{gb(row['generate_measured_bytes']):>18}  {gb(row['generate_predicted_bytes']):>9} ({pct(row['generate_prediction_error']):>6})"
            f"  {gb(row['generate_published_bytes']):>9}  {row['ttft_s']:>7.2f}  {row['decode_tokens_per_s'] or 0:>12.2f}  {ppl:>10}"
        )
    return "\n".join(lines)


CSV_FIELDS = (
    "run",
    "date",
    "state",
    "model",
    "weights",
    "device",
    "device_name",
    "torch",
    "transformers",
    "encode_tokens",
    "generate_tokens",
    "level",
    "error",
    "weights_bytes",
    "predicted_weights_bytes",
    "encode_measured_bytes",
    "encode_predicted_bytes",
    "encode_prediction_error",
    "encode_published_bytes",
    "encode_vs_published",
    "generate_measured_bytes",
    "generate_predicted_bytes",
    "generate_prediction_error",
    "generate_published_bytes",
    "generate_vs_published",
    "ttft_s",
    "decode_tokens_per_s",
    "perplexity",
)


def csv_rows(records: list[dict]) -> list[dict]:
    """One row per run and level, every figure in bytes or seconds; text cells cannot run as formulas."""
    from datetime import datetime

    from ...conversations.exchange import spreadsheet_safe

    rows = []
    for record in records:
        request, env = record["request"], record.get("environment", {})
        date = datetime.fromtimestamp(record.get("finished_at") or record["started_at"], UTC).isoformat()
        for row in comparison_rows(record):
            full = {
                "run": record.get("id", ""),
                "date": date,
                "state": record.get("state", ""),
                "model": request["source"],
                "device": env.get("device", ""),
                "device_name": env.get("device_name", ""),
                "torch": env.get("torch", ""),
                "transformers": env.get("transformers", ""),
                "encode_tokens": request["encode"],
                "generate_tokens": request["generate"],
                **row,
            }
            rows.append({k: "" if full.get(k) is None else spreadsheet_safe(full.get(k)) for k in CSV_FIELDS})
    return rows


def predict(request: MemoryBenchRequest) -> list[dict]:
    """The estimator's figures for a request, with the published ones where they exist (before any run)."""
    _, cfg = source_config(request.source)
    on = resolve_device(request.device).type
    table = published(request.source, request.encode, request.generate) or {}
    rows = []
    for e in estimate(cfg, list(request.levels), request.encode, request.generate, on, request.group_size):
        encode_pub, generate_pub = table.get(e.level, (None, None))
        rows.append({**e.to_dict(), "encode_published_bytes": encode_pub, "generate_published_bytes": generate_pub})
    return rows
