"""Checkpoint files read tensor by tensor into a model built on the meta device: one loop for every route.

A route builds its model on the meta device, gives `fill_from_checkpoint` the weight files and a key remap
(checkpoint name and tensor -> model names and tensors), and gets the model back filled. At INT8/INT4 every weight
the quantization policy covers is quantized the moment it is read; everything else is assigned as it comes
(`load_state_dict(assign=True)` per shard). So memory peaks near the model's size at its own precision, never
twice it, and a quantized model never exists in full precision.

Routes: ChatGLM2/3 folders (`chatglm_checkpoint`, with its THUDM key remap) and Hugging Face causal-LM folders
with safetensors weights (`load_hf_model`, names kept as they are). A folder this loop does not understand
(pickled .bin weights, renamed or extra keys, pre-quantized configs) raises `StreamingUnsupported` before any
weight is read, and the caller loads it with `from_pretrained` instead.
"""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..settings import DEFAULT_GROUP_SIZE
from .precision import Precision
from .quant import (
    WeightOnlyInt8Embedding,
    quantized_tensor_shapes,
    set_quantized_tensor,
    swap_in_quantized_linears,
    tie_output_layer,
)

Remap = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]


class CheckpointError(Exception):
    """The folder's weights cannot be used; the message says why in one line."""


class StreamingUnsupported(CheckpointError):
    """The folder needs something only `from_pretrained` does; raised before any weight is read."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is not valid JSON: {exc}") from None


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json); CheckpointError with the reason otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return value


def weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index_name} lists {len(missing)} missing shard(s), e.g. {missing[0]}")
            return [folder / s for s in shards]
    for pattern in ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model.bin", "pytorch_model-*-of-*.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{folder.name} has no weights (pytorch_model*.bin or *.safetensors)")


def read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one shard, one at a time."""
    try:
        if path.suffix == ".safetensors":
            yield from _read_safetensors(path)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be mmapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            for key in list(state):
                yield key, state.pop(key)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path.name} is corrupt or truncated: {str(exc).splitlines()[0][:200]}") from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _is_tensor_entry(info) -> bool:
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    return (
        isinstance(shape, list)
        and all(whole(n) for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(whole(n) for n in offsets)
        and offsets[0] <= offsets[1]
    )


def safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """({tensor name: {"dtype", "shape", "data_offsets"}}, where the data starts) from the file's header alone,
    checked against the file's size: a truncated download is refused before any tensor is read."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if header_size <= 0 or header_size > 100 * 2**20:
                raise CheckpointError(f"{path.name} is not a safetensors file")
            header = json.loads(f.read(header_size))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path.name} is corrupt or truncated: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path.name} is not a safetensors file: its header is a JSON {type(header).__name__}, not an object"
        )
    header.pop("__metadata__", None)
    for key, info in header.items():
        if not _is_tensor_entry(info):
            raise CheckpointError(
                f"{path.name} is corrupt: the header entry for {str(key)[:80]!r} is not a tensor "
                "description (dtype, shape, data_offsets)"
            )
    data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + header_size + data_end > path.stat().st_size:
        raise CheckpointError(f"{path.name} is truncated: its header describes more data than the file holds")
    for key, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path.name}: tensor {key} has dtype {info['dtype']}, which is not supported")
    return header, 8 + header_size


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a .safetensors file read one by one with plain reads, not a memory map of the file: mapped
    pages that were touched count as this process's memory until the file is closed, which would put the whole
    shard on top of the (quantized) model at the peak. Each tensor is read into an anonymous mapping of its own,
    not a malloc'd buffer: freeing it unmaps it at once, whereas malloc keeps freed read buffers of a few MiB
    in its heap, interleaved with the quantized weights allocated meanwhile (an INT8 load of SmolLM2-135M
    peaked at 500 MiB that way, against 180 MiB at INT4, whose int32 temporaries happened to refill the holes)."""
    header, data_start = safetensors_header(path)
    with open(path, "rb") as f:
        for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            if end == begin:
                yield key, torch.empty(info["shape"], dtype=dtype)
                continue
            f.seek(data_start + begin)
            raw = mmap.mmap(-1, end - begin)
            if f.readinto(raw) != end - begin:
                raise CheckpointError(f"{path.name} is truncated (tensor {key})")
            yield key, torch.frombuffer(raw, dtype=dtype).reshape(info["shape"])


def tied_output_weights(model) -> dict[str, str]:
    """{output layer weight: embedding weight} when the model ties them, else {}. Other ties (rare outside
    language-model heads) are left to from_pretrained."""
    ties = dict(getattr(model, "all_tied_weights_keys", None) or {})
    if not ties:
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    expected = {f"{names.get(id(output))}.weight": f"{names.get(id(embedding))}.weight"}
    if ties != expected:
        raise StreamingUnsupported(f"it ties weights other than the output layer to the embedding: {ties}")
    return ties


def build_computed_buffers(model, device: torch.device) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are computed in `__init__`, never stored, so on the
    meta device they hold nothing. As from_pretrained does, make them real and let the model's own `_init_weights`
    compute them; a buffer it leaves unset (pre-filled with NaN) means the architecture needs more than this."""
    owners = []
    for module_name, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is None or not buffer.is_meta:
                continue
            if not buffer.is_floating_point():
                raise StreamingUnsupported(f"it computes a non-float buffer {module_name}.{name} at construction")
            module._buffers[name] = torch.full_like(buffer, float("nan"), device=device)
            owners.append((module_name, module))
    for _, module in {id(m): (n, m) for n, m in owners}.values():
        model._init_weights(module)
    for module_name, module in owners:
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.isnan().any():
                raise StreamingUnsupported(f"its _init_weights does not compute the buffer {module_name}.{name}")


_EXPERT_PIECE = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<part>gate_proj|up_proj|down_proj)\.weight$")
# transformers' conversion of such checkpoints (qwen2_moe's mapping, which GLM-4.5 and GLM-4.7-Flash use): the only
# key conversions the streaming loader performs itself.
EXPERT_MERGES = {
    ("mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"): ("mlp.experts.gate_up_proj",),
    ("mlp.experts.*.down_proj.weight",): ("mlp.experts.down_proj",),
}


class ExpertPieces:
    """A MoE checkpoint's experts stored one tensor per expert (GLM-4.5's `mlp.experts.7.gate_proj.weight`,
    `up_proj`, `down_proj`) written into the model's fused tensors as transformers' conversion merges them
    (`gate_up_proj` [experts, 2I, H] with the gate rows first, `down_proj` [experts, H, I]), one expert at a time:
    a quantized stack quantizes each expert as its pieces complete, a float tensor fills its slice. At INT8/INT4
    no float tensor of a whole layer's experts is ever made."""

    def __init__(self, model, quantized: dict, dtype: torch.dtype, device: torch.device):
        self.model, self.quantized, self.dtype, self.device = model, quantized, dtype, device
        self.halves: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # a gate waiting for its up, or back
        self.written: dict[str, set[int]] = {}  # fused tensor name -> experts written
        self.float_tensors: dict[str, torch.Tensor] = {}

    @staticmethod
    def match(name: str):
        return _EXPERT_PIECE.match(name)

    def add(self, match, value: torch.Tensor) -> list[str]:
        """Take one piece; returns the fused tensors it completed (every expert written)."""
        module, expert, part = match["module"], int(match["expert"]), match["part"]
        if part == "down_proj":
            kind = "down_proj"
        else:
            halves = self.halves.setdefault((module, expert), {})
            halves[part] = value
            if len(halves) < 2:
                return []
            del self.halves[(module, expert)]
            kind, value = "gate_up_proj", torch.cat([halves["gate_proj"], halves["up_proj"]])
        name = f"{module}.{kind}"
        shape = self._shape(module, kind)
        if not 0 <= expert < shape[0] or tuple(value.shape) != tuple(shape[1:]):
            raise CheckpointError(f"weights do not match config.json: expert {expert} of {name}, {tuple(value.shape)}")
        if module in self.quantized:
            self.quantized[module].set_expert(kind, expert, value.to(self.device))
        else:
            if name not in self.float_tensors:
                self.float_tensors[name] = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.float_tensors[name][expert] = value
        written = self.written.setdefault(name, set())
        written.add(expert)
        return [name] if len(written) == shape[0] else []

    def _shape(self, module: str, kind: str) -> tuple[int, ...]:
        if module in self.quantized:
            return self.quantized[module].float_shapes[kind]
        try:
            return tuple(getattr(self.model.get_submodule(module), kind).shape)
        except AttributeError:
            raise CheckpointError(f"the checkpoint has experts at {module}, which this config does not") from None

    def finish(self) -> None:
        if self.halves:
            (module, expert), parts = next(iter(self.halves.items()))
            raise CheckpointError(f"weights are incomplete: expert {expert} of {module} has only {', '.join(parts)}")
        for name, tensor in self.float_tensors.items():
            module, _, kind = name.rpartition(".")
            setattr(self.model.get_submodule(module), kind, torch.nn.Parameter(tensor, requires_grad=False))


def fill_from_checkpoint(
    model,
    files: list[Path],
    remap: Remap,
    precision: Precision,
    device: torch.device,
    progress: Callable[[float, str], None],
    group_size: int = DEFAULT_GROUP_SIZE,
    expert_pieces: bool = False,
    keep_fp32: frozenset[str] = frozenset(),
):
    """Fill `model` (built on the meta device at `precision.dtype`) from `files`, quantizing as it reads.

    Policy weights are quantized from the checkpoint's own values (an FP32 or FP16 file is not rounded to BF16
    first). A tied output layer is read from whichever of the two names the checkpoint stores (safetensors keeps
    one: `save_model` may keep either) and shares the embedding's table afterwards, an INT8 table at INT8/INT4.
    With `expert_pieces`, per-expert MoE tensors are merged into the fused ones as they come (`ExpertPieces`).
    Tensors of modules named in `keep_fp32` stay FP32 (transformers' _keep_in_fp32_modules: GLM-4.5's router bias).
    Raises CheckpointError when the weights are incomplete, have extra tensors or do not fit the config."""
    dtype = precision.dtype
    tied = tied_output_weights(model)
    source_of = {**tied, **{source: source for source in tied.values()}}
    expected = set(model.state_dict()) - set(tied)
    build_computed_buffers(model, device)
    quantized = swap_in_quantized_linears(model, precision, dtype, group_size) if precision.is_quantized else {}
    pieces = ExpertPieces(model, quantized, dtype, device) if expert_pieces else None
    loaded: set[str] = set()
    for number, path in enumerate(files, start=1):
        progress(0.3 + 0.6 * (number - 1) / len(files), f"Loading {path.name} ({number}/{len(files)})")
        batch = {}
        for key, tensor in read_shard(path):
            for name, value in remap(key, tensor):
                name = source_of.get(name, name)
                match = pieces.match(name) if pieces is not None and name not in expected else None
                if match:
                    loaded.update(pieces.add(match, value))
                    continue
                if name not in expected:
                    raise CheckpointError(f"tensor {key!r} does not fit this config (no {name})")
                module, _, kind = name.rpartition(".")
                shapes = quantized_tensor_shapes(quantized[module]) if module in quantized else {}
                if kind in shapes:
                    if tuple(value.shape) != shapes[kind]:
                        raise CheckpointError(f"weights do not match config.json: {key} has shape {tuple(value.shape)}")
                    set_quantized_tensor(quantized[module], kind, value.to(device))
                    loaded.add(name)
                else:
                    fp32 = keep_fp32 and not keep_fp32.isdisjoint(name.split("."))
                    target = (torch.float32 if fp32 else dtype) if value.is_floating_point() else value.dtype
                    batch[name] = value.to(device=device, dtype=target)
        try:
            model.load_state_dict(batch, strict=False, assign=True)
        except RuntimeError as exc:  # shape mismatch between config.json and the weights
            raise CheckpointError(
                f"weights do not match config.json: {str(exc).splitlines()[-1].strip()[:200]}"
            ) from None
        loaded |= set(batch)
        del batch
    if pieces is not None:
        pieces.finish()
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"weights are incomplete: {len(missing)} tensor(s) missing, e.g. {missing[0]}")
    for output_name, embedding_name in tied.items():
        embedding = model.get_submodule(embedding_name.rpartition(".")[0])
        if isinstance(embedding, WeightOnlyInt8Embedding):
            tie_output_layer(model, embedding, dtype)
        else:
            output = model.get_submodule(output_name.rpartition(".")[0])
            output.weight = embedding.weight
    left = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if left is not None:
        raise CheckpointError(f"the model's {left} is neither in the checkpoint nor computed")
    model.eval()
    return model


class _HFKeys:
    """Checkpoint names -> model names for a Hugging Face folder: the same names, the base-model prefix added
    when the checkpoint was saved from the bare model, and the names transformers itself ignores dropped."""

    def __init__(self, model):
        self.expected = set(model.state_dict())
        self.prefix = model.base_model_prefix
        # Old checkpoints stored rotary inverse frequencies and position ids that are computed now (transformers
        # drops them the same way in `_adjust_missing_and_unexpected_keys`).
        patterns = {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$", *(model._keys_to_ignore_on_load_unexpected or ())}
        self.ignored = re.compile("|".join(f"({p})" for p in patterns))

    def name(self, key: str) -> str | None:
        """The model's name for `key`, None for a key to drop, `key` itself when the model has no such name."""
        if key in self.expected:
            return key
        if self.prefix and f"{self.prefix}.{key}" in self.expected:
            return f"{self.prefix}.{key}"
        return None if self.ignored.search(key) else key

    def __call__(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        name = self.name(key)
        return [] if name is None else [(name, tensor)]


def load_hf_model(
    folder: Path,
    precision: Precision,
    device: torch.device,
    progress: Callable[[float, str], None],
    group_size: int = DEFAULT_GROUP_SIZE,
):
    """A Hugging Face causal-LM folder with safetensors weights, built on the meta device from its config and
    filled tensor by tensor. Raises StreamingUnsupported, before reading any weight, for what it does not
    understand; the caller then uses from_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping

    files = weight_files(folder)
    if any(f.suffix != ".safetensors" for f in files):
        raise StreamingUnsupported("its weights are pickled .bin files")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # e.g. a model type this transformers does not know: from_pretrained says why
        raise StreamingUnsupported(f"AutoConfig cannot read it: {str(exc).splitlines()[0][:200]}") from None
    if getattr(config, "quantization_config", None):
        raise StreamingUnsupported("its config is pre-quantized (quantization_config)")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=precision.dtype)
    except Exception as exc:
        raise StreamingUnsupported(f"no causal-LM class builds it: {str(exc).splitlines()[0][:200]}") from None
    conversions = get_model_conversion_mapping(model, add_legacy=False)
    merges = {(tuple(c.source_patterns), tuple(c.target_patterns)) for c in conversions or ()}
    expert_pieces = bool(merges) and all(EXPERT_MERGES.get(source) == target for source, target in merges)
    if getattr(model, "_checkpoint_conversion_mapping", None) or (conversions and not expert_pieces):
        raise StreamingUnsupported("transformers renames or merges its checkpoint keys while loading")
    # Kept in FP32 by name (GLM-4.5's router bias, e_score_correction_bias), as from_pretrained keeps them.
    keep_fp32 = frozenset([*(model._keep_in_fp32_modules or ()), *(model._keep_in_fp32_modules_strict or ())])
    remap = _HFKeys(model)
    stored = {remap.name(key) for path in files for key in safetensors_header(path)[0]}
    unknown = sorted(
        n for n in stored - {None} if n not in remap.expected and not (expert_pieces and ExpertPieces.match(n))
    )
    if unknown:
        raise StreamingUnsupported(f"the checkpoint has {len(unknown)} tensor(s) the model lacks, e.g. {unknown[0]}")
    both_tied = [k for k, v in tied_output_weights(model).items() if k in stored and v in stored]
    if both_tied:  # the config says tied, the file holds two tables: from_pretrained compares them
        raise StreamingUnsupported(f"the checkpoint stores the tied {both_tied[0]} separately")
    return fill_from_checkpoint(model, files, remap, precision, device, progress, group_size, expert_pieces, keep_fp32)
