"""Sampling defaults per model, where each one came from, and the one place a request's controls are composed with
them (torch-free: the loader, the pages, the CLI and the API all use it).

The model's defaults, field by field (`model_defaults`):
1. the model folder's `generation_config.json`, when it sets the field (what the model's authors recommend);
2. the family's documented defaults, written out completely (the `chat()` signatures of the original ChatGLM
   code: no repetition penalty, no top-k);
3. a model's published recommendation we know of (the embedded SmolLM2's model card);
4. ours.

Every door (chat page, CLI, HTTP API, remote backends) composes a request's controls with `compose_params`: the
request's own field, else the person's saved setting, else the model's defaults above. A person's own changes are
kept per workspace (`effective_controls` for the page's widgets); "reset to the model's defaults" drops them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .protocol import ModelCard, SamplingParams

CONTROLS = ("max_length", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")

GENERATION_CONFIG = "generation_config.json"
OURS = "this app's defaults"

# The original `chat()` / `stream_chat()` signatures: ChatGLM-6B max_length 2048, top_p 0.7, temperature 0.95;
# ChatGLM2-6B and ChatGLM3-6B max_length 8192, top_p 0.8, temperature 0.8. None of them penalises repetition or
# uses top-k (generate()'s repetition_penalty 1.0 and, since chat() passes its own logits processors, no top-k):
# written out, so that ours (a penalty of 1.1) never fills them in. The reply's own room is not a sampling
# control of chat() (it bounds the total), so max_new_tokens stays ours.
_CHATGLM_ORIGINAL = {"top_k": 0, "repetition_penalty": 1.0}
_CHATGLM_6B = (
    "ChatGLM-6B documented defaults",
    {"max_length": 2048, "top_p": 0.7, "temperature": 0.95, **_CHATGLM_ORIGINAL},
)
_CHATGLM_2_3 = (
    "ChatGLM2/3 documented defaults",
    {"max_length": 8192, "top_p": 0.8, "temperature": 0.8, **_CHATGLM_ORIGINAL},
)
# Keyed by the family label lower-cased without "-" ("ChatGLM-6B" -> "chatglm6b").
FAMILY_DEFAULTS = {
    "chatglm": _CHATGLM_6B,
    "chatglm6b": _CHATGLM_6B,
    "chatglm1": _CHATGLM_6B,
    "chatglm2": _CHATGLM_2_3,
    "chatglm3": _CHATGLM_2_3,
}

# SmolLM2-135M-Instruct's model card samples with temperature 0.2, top_p 0.9.
MODEL_CARD_DEFAULTS = {"SmolLM2-135M-Instruct": ("SmolLM2 model card", {"temperature": 0.2, "top_p": 0.9})}

# Ours, for what a model recommends nothing about. The repetition penalty decided it: the embedded model writing
# a 400-token story (2 seeds) repeated sentences with the seeds' 0.8 / 0.8 (13 distinct of 15, and a loop) and
# with its card's 0.2 / 0.9 (10 distinct of 20), and none with a penalty of 1.1 at 0.2 / 0.9 or 0.7 / 0.9.
OUR_DEFAULTS = {
    "max_length": 8192,
    "max_new_tokens": 1024,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 0,
    "repetition_penalty": 1.1,
}

_LIMITS = {  # what a recommendation may hold to be taken (anything else in a file is ignored, not trusted)
    "max_length": (2, 2**31),
    "max_new_tokens": (1, 2**31),
    "temperature": (0.0, 100.0),
    "top_p": (1e-6, 1.0),
    "top_k": (0, 2**31),
    "repetition_penalty": (1e-6, 100.0),
}
_INTEGERS = {"max_length", "max_new_tokens", "top_k"}
# What the chat page's controls offer; a default outside is brought to the nearest end.
CONTROL_RANGES = {
    "max_length": (64, 131072),
    "max_new_tokens": (1, 4096),
    "temperature": (0.0, 2.0),
    "top_p": (0.05, 1.0),
    "top_k": (0, 1000),
    "repetition_penalty": (0.5, 2.0),
}
LABELS = {
    "max_length": "max length",
    "max_new_tokens": "max new tokens",
    "temperature": "temperature",
    "top_p": "top p",
    "top_k": "top k",
    "repetition_penalty": "repetition penalty",
}
YOURS = "your setting"
REQUEST = "the request"


def read_generation_config(folder: Path | str | None) -> dict:
    """The JSON object of `folder/generation_config.json`, or {} when there is none or it is not an object."""
    if folder is None:
        return {}
    path = Path(folder) / GENERATION_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def from_generation_config(config: dict) -> dict:
    """The sampling controls a generation_config.json recommends (only those it sets, valid ones).

    `do_sample: false` means greedy (temperature 0). `top_k` is taken only with sampling. A file transformers wrote
    from the model config (`_from_model_config`) recommends nothing: its values are library defaults.
    """
    if config.get("_from_model_config"):
        return {}
    found = {}
    for name in CONTROLS:
        value = _valid(name, config.get(name))
        if value is not None:
            found[name] = value
    if config.get("do_sample") is False:
        found["temperature"] = 0.0
        found.pop("top_k", None)
    return found


def model_defaults(
    family: str, name: str, generation_config: dict | None = None, max_context: int | None = None
) -> dict:
    """The model's defaults: {control: value, ..., "sources": {control: where it came from}, "source": summary}."""
    layers = [
        (GENERATION_CONFIG, from_generation_config(generation_config or {})),
        FAMILY_DEFAULTS.get(family.lower().replace("-", ""), ("", {})),
        MODEL_CARD_DEFAULTS.get(name, ("", {})),
        (OURS, OUR_DEFAULTS),
    ]
    values, sources = {}, {}
    for source, recommended in layers:
        for control, value in recommended.items():
            if control not in values:
                values[control], sources[control] = value, source
    if max_context and values["max_length"] > max_context:
        values["max_length"], sources["max_length"] = max_context, "the model's context length"
    if values["max_new_tokens"] >= values["max_length"]:
        values["max_new_tokens"] = values["max_length"] - 1
    picked = [source for source, _ in layers if source in sources.values()]
    return {**values, "sources": sources, "source": picked[0] if picked else OURS}


def card_defaults(card: ModelCard | None) -> dict:
    """The sampling defaults a backend's card carries (the loader's or a server's); a card with none: ours."""
    return (card.sampling_defaults if card is not None else None) or model_defaults("", "", {})


def compose_params(
    defaults: dict | None, given: dict | None = None, saved: dict | None = None, seed: int | None = None
) -> tuple[SamplingParams, dict[str, str]]:
    """The one composition of sampling controls, for every door: the request's own field (`given`: the CLI's
    options, an API body's fields; None means left out), else the person's saved setting (`saved`: the page's
    workspace settings), else the model's defaults (`model_defaults`; None: a model that recommends nothing).

    Returns the validated params, whose `explicit` names what the request or the person set (a remote backend sends
    only those), and each control's source. An out-of-range value in `given` raises ValueError with the reason; one
    in `saved` is dropped (it was kept by an older version, not typed now). When the room for the reply was not
    by the request, it shrinks to fit the max_length.
    """
    defaults = defaults or card_defaults(None)
    given = {control: value for control, value in (given or {}).items() if value is not None}
    unknown = set(given) - set(CONTROLS)
    if unknown:
        raise ValueError(f"unknown sampling controls: {', '.join(sorted(unknown))}")
    saved = {
        control: value
        for control, value in (saved or {}).items()
        if control in CONTROLS and control not in given and _valid(control, value) is not None
    }
    values, sources = {}, {}
    for control in CONTROLS:
        if control in given:
            values[control], sources[control] = given[control], REQUEST
        elif control in saved:
            values[control], sources[control] = saved[control], YOURS
        else:
            values[control], sources[control] = defaults[control], defaults["sources"][control]
    if "max_new_tokens" not in given and isinstance(values["max_length"], int):
        values["max_new_tokens"] = max(1, min(values["max_new_tokens"], values["max_length"] - 1))
    params = SamplingParams(**values, seed=seed, explicit=frozenset(given) | frozenset(saved))
    return params.validate(), sources


def server_defaults(server: str, announced) -> dict:
    """A remote server's defaults, in `model_defaults`' form: what its /v1/models entry announces (this project's
    `serve` does, as `defaults`), control by control; the rest are the server's own business. Those are shown as
    ours, but a remote backend never sends them (only what the person or the client set), so the server's own
    apply."""
    announced = announced if isinstance(announced, dict) else {}
    theirs = announced.get("sources") if isinstance(announced.get("sources"), dict) else {}
    values, sources = {}, {}
    for control in CONTROLS:
        value = _valid(control, announced.get(control))
        if value is None:
            values[control], sources[control] = OUR_DEFAULTS[control], f"{server}'s own (not known here, not sent)"
        else:
            origin = theirs.get(control)
            values[control] = value
            sources[control] = f"{server}: {origin[:80]}" if isinstance(origin, str) and origin else server
    return {**values, "sources": sources, "source": f"the server {server}"}


def effective_controls(defaults: dict, overrides: dict) -> dict:
    """The controls a person gets: their own (valid) changes over the model's defaults.

    Returns {control: (value, source)}, each value within CONTROL_RANGES; a changed control's source is YOURS.
    """
    out = {}
    for control in CONTROLS:
        own = _valid(control, overrides.get(control))
        value, source = (own, YOURS) if own is not None else (defaults[control], defaults["sources"][control])
        low, high = CONTROL_RANGES[control]
        out[control] = (min(max(value, low), high), source)
    return out


def describe_sources(controls: dict, defaults: dict) -> list[str]:
    """One line per source, for the sidebar: "SmolLM2 model card: temperature 0.2, top p 0.9", and the person's
    own settings with the model's default beside each."""
    by_source: dict[str, list[str]] = {}
    for control, (value, source) in controls.items():
        text = f"{LABELS[control]} {value:g}"
        if source == YOURS:
            text += f" (model: {defaults[control]:g})"
        by_source.setdefault(source, []).append(text)
    yours, ours = by_source.pop(YOURS, None), by_source.pop(OURS, None)  # the model's own first
    lines = [f"{source}: {', '.join(items)}" for source, items in by_source.items()]
    lines += [f"{OURS}: {', '.join(ours)}"] if ours else []
    return lines + ([f"{YOURS}s: {', '.join(yours)}"] if yours else [])


def clean_overrides(overrides: dict, defaults: dict) -> dict:
    """Only the valid controls that differ from the model's defaults (what is worth keeping for a workspace)."""
    out = {}
    for control in CONTROLS:
        value = _valid(control, overrides.get(control))
        if value is not None and value != defaults.get(control):
            out[control] = value
    return out


def _valid(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    low, high = _LIMITS[name]
    if not low <= value <= high:
        return None
    return int(value) if name in _INTEGERS else round(float(value), 4)
