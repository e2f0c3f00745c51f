"""The cost of grammar-constrained decoding, in one run:

1. per grammar library (llguidance, and xgrammar and outlines-core when importable): compiling a JSON schema for
   the model's vocabulary, then the mask for each token of a valid reply (compute the allowed set, apply it to a
   logits row, advance by the token); the median per token.
2. the engine end to end: decode time per token of free rows and of rows decoded under a JSON schema, one stream
   and two streams side by side (one constrained, one free), with the ratio to free decoding.

`python -m glm_core bench constrained` (the embedded model by default).
"""

from __future__ import annotations

import json
import statistics
import time
import uuid

import torch

from ..models.loading import LoadedModel
from ..protocol import OutputSpec, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
REPLY = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@analytical-engine.example",
    "tags": ["mathematics", "poetry", "engines"],
    "address": {"city": "London", "country": "United Kingdom"},
}


def _apply(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~allowed, float("-inf"))


def _llguidance(tokenizer, n_vocab: int, eos: list[int], ids: list[int], logits: torch.Tensor) -> dict:
    import llguidance

    from ..engine.constraints import Constraint, _llg_tokenizer
    from ..models.tool_formats import json_schema_grammar

    started = time.perf_counter()
    _llg_tokenizer(tokenizer, n_vocab, frozenset(eos))  # built once per model (cached), as the engine does
    tokenizer_s = time.perf_counter() - started
    grammar = llguidance.LLMatcher.grammar_from_lark(json_schema_grammar(SCHEMA))
    started = time.perf_counter()
    constraint = Constraint(grammar, tokenizer, n_vocab, frozenset(eos))
    compile_s = time.perf_counter() - started
    per_token = []
    for token in ids:
        started = time.perf_counter()
        masked = constraint.mask(logits)
        constraint.accept(token)
        per_token.append(time.perf_counter() - started)
        assert masked[token] > float("-inf")
    return {"library": "llguidance", "tokenizer_s": tokenizer_s, "compile_s": compile_s, "per_token": per_token}


def _xgrammar(tokenizer, n_vocab: int, eos: list[int], ids: list[int], logits: torch.Tensor) -> dict | None:
    try:
        import xgrammar
    except ImportError:
        return None
    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=n_vocab, stop_token_ids=eos)
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    matcher = xgrammar.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - started
    bitmask = xgrammar.allocate_token_bitmask(1, n_vocab)
    per_token = []
    for token in ids:
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        row = logits.clone()[None]
        xgrammar.apply_token_bitmask_inplace(row, bitmask)
        assert matcher.accept_token(token)
        per_token.append(time.perf_counter() - started)
    return {"library": "xgrammar", "tokenizer_s": tokenizer_s, "compile_s": compile_s, "per_token": per_token}


def _outlines_core(tokenizer, n_vocab: int, eos: list[int], ids: list[int], logits: torch.Tensor) -> dict | None:
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return None
    started = time.perf_counter()
    vocabulary: dict[str, list[int]] = {}
    for token_id in range(len(tokenizer)):
        if token_id in eos:
            continue
        text = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])
        vocabulary.setdefault(tokenizer.convert_ids_to_tokens(token_id) if not text else text, []).append(token_id)
    vocab = Vocabulary(eos[0], vocabulary)
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=r"[ ]?"), vocab)
    guide = Guide(index)
    compile_s = time.perf_counter() - started
    per_token = []
    for token in ids:
        started = time.perf_counter()
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        allowed[torch.tensor(guide.get_tokens(), dtype=torch.long)] = True
        _apply(logits, allowed)
        guide.advance(token)
        per_token.append(time.perf_counter() - started)
    return {"library": "outlines-core", "tokenizer_s": tokenizer_s, "compile_s": compile_s, "per_token": per_token}


def library_costs(loaded: LoadedModel, repeats: int = 3) -> list[dict]:
    """Each library's cost on this model's vocabulary, over the tokens of one valid reply."""
    tokenizer = loaded.tokenizer
    n_vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
    eos = sorted(loaded.chat_format.stop_token_ids)
    text = json.dumps(REPLY, ensure_ascii=False, separators=(", ", ": "))
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    logits = torch.randn(n_vocab)
    results = []
    for measure in (_llguidance, _xgrammar, _outlines_core):
        try:  # the first run builds what the library caches; the median is over the tokens of the later ones
            runs = [measure(tokenizer, n_vocab, eos, ids, logits) for _ in range(1 + repeats)]
        except Exception as exc:  # a library that cannot take this vocabulary or schema is reported as such
            results.append({"library": measure.__name__.strip("_"), "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        if runs[0] is None:
            continue
        result = {**runs[0], "compile_s": statistics.median(r["compile_s"] for r in runs[1:])}
        result["median_ms_per_token"] = statistics.median(t for r in runs[1:] for t in r["per_token"]) * 1000
        del result["per_token"]
        results.append(result)
    return results


def engine_costs(loaded: LoadedModel, tokens: int, repeats: int) -> dict:
    """Milliseconds per decode step through the engine: one free row vs one row under a JSON schema, and a batch of
    two free rows vs a batch of one free and one constrained row (they decode together)."""
    from ..engine import Engine

    engine = Engine(loaded)
    # A prompt the model answers at length, so a free row also decodes (nearly) max_new_tokens.
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON."}]
    params = SamplingParams(max_new_tokens=tokens, temperature=0.7, top_p=0.9, seed=0, max_length=4096)
    # A JSON value that cannot end before max_new_tokens, so constrained and free rows decode as many tokens.
    long_text = {"type": "object", "properties": {"story": {"type": "string", "minLength": 40 * tokens}}}
    constrained = OutputSpec(json_schema={**long_text, "required": ["story"], "additionalProperties": False})

    def run(outputs: list[OutputSpec | None]) -> float:
        """The batch's wall time (prefill included) over the tokens of its longest row."""
        started = time.perf_counter()
        requests = [  # recomputed: each prefills its prompt (a kept one would answer it without a prefill)
            engine.submit(uuid.uuid4().hex, messages, params, recompute=True, **({"output": o} if o else {}))
            for o in outputs
        ]
        replies = [r.wait() for r in requests]
        return (time.perf_counter() - started) * 1000 / max(r.stats.completion_tokens for r in replies)

    try:
        run([None])  # warm-up
        figures: dict[str, list[float]] = {"free": [], "json": [], "two_free": [], "free_and_json": []}
        runs = [("free", [None]), ("json", [constrained]), ("two_free", [None, None])]
        runs.append(("free_and_json", [None, constrained]))
        for repeat in range(repeats):  # the order alternates, so drift on a shared machine falls on all of them
            for name, outputs in runs if repeat % 2 == 0 else runs[::-1]:
                figures[name].append(run(outputs))
    finally:
        engine.close()
    medians = {name: statistics.median(values) for name, values in figures.items()}
    medians["json_over_free"] = medians["json"] / medians["free"]
    medians["mixed_over_two_free"] = medians["free_and_json"] / medians["two_free"]
    return medians


def run_constrained_bench(loaded: LoadedModel, tokens: int = 48, repeats: int = 3) -> dict:
    return {
        "model": loaded.name,
        "precision": loaded.precision.label,
        "libraries": library_costs(loaded, repeats),
        "engine": engine_costs(loaded, tokens, repeats),
    }


def format_constrained_report(result: dict) -> str:
    lines = [
        f"Constrained decoding on {result['model']} ({result['precision']})",
        "",
        "Grammar libraries (JSON schema):",
    ]
    for library in result["libraries"]:
        if "error" in library:
            lines.append(f"  {library['library']:14} failed: {library['error']}")
            continue
        lines.append(
            f"  {library['library']:14} vocabulary {library['tokenizer_s'] * 1000:8.1f} ms   "
            f"compile {library['compile_s'] * 1000:8.1f} ms   mask+advance {library['median_ms_per_token']:.3f} ms/token"
        )
    e = result["engine"]
    lines += [
        "",
        "Engine, ms per decode step (a run's wall time over its tokens, median):",
        f"  one row:  free {e['free']:.2f}   json {e['json']:.2f}   ratio {e['json_over_free']:.2f}",
        f"  two rows: both free {e['two_free']:.2f}   free + json {e['free_and_json']:.2f}   "
        f"ratio {e['mixed_over_two_free']:.2f}",
    ]
    return "\n".join(lines)
