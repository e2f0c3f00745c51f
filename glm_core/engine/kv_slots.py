"""The batch's KV cache: one slot per running sequence, each with its own length.

Per layer, keys live in one buffer [rows, kv_heads, capacity, head_dim] and values in one [rows, value_heads,
capacity, value_dim] (the same shape but for multi-head latent attention: GLM-4.7-Flash caches its compressed
latent, one "head" of kv_lora_rank as the keys and the shared rotary key, one head of qk_rope_head_dim, as the
values, and expands them to per-head keys and values inside attention). The running sequences occupy
slots 0..n-1 (kept contiguous: a leaving row's place is taken by the last row), so a decode step attends over a
view of the first n slots, never a gathered copy. Each row writes its new key/value at its own length, and a
[n, 1, 1, kv_len] mask hides every position past it.

Chosen by measurement over left-padded stacks of per-conversation DynamicCaches (see docs/BENCHMARKS.md,
"Batch cache"): those grow by torch.cat, which copies every row's whole cache at every step and re-pads the stack
whenever a row joins or leaves; slots copy one row's cache when it joins or leaves and nothing per step.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

CAPACITY_STEP = 256  # the capacity grows in steps of this many positions, so most steps reallocate nothing


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class SlotCache(Cache):
    """A transformers Cache for batched decode over slots (see the module docstring).

    Before each forward the runner calls `prepare_decode(lengths)`: row r writes at position lengths[r].
    """

    is_compileable = False

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        slots: int,
        value_heads: int | None = None,
        value_dim: int | None = None,
    ):
        super().__init__(layers=[])
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.value_heads = kv_heads if value_heads is None else value_heads
        self.value_dim = head_dim if value_dim is None else value_dim
        self.dtype, self.device, self.slots = dtype, device, slots
        self.capacity = 0  # positions per slot
        self.rows = 0  # slots allocated (running rows <= rows <= slots)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # tokens held per occupied slot, slots 0..n-1
        self._positions = torch.empty(0, dtype=torch.long, device=device)
        self._write_index: torch.Tensor | None = self._positions
        self._value_write_index: torch.Tensor | None = self._positions
        self._rows = self._positions
        self._kv_len = 0

    # ---- bookkeeping --------------------------------------------------------------------------------------

    @property
    def occupied(self) -> int:
        return len(self.lengths)

    def bytes_per_position(self) -> int:
        per_layer = self.kv_heads * self.head_dim + self.value_heads * self.value_dim
        return self.num_layers * per_layer * torch.empty(0, dtype=self.dtype).element_size()

    def nbytes(self) -> int:
        return self.capacity * self.rows * self.bytes_per_position()

    def bytes_if(self, rows: int, longest: int) -> int:
        """What the buffers take when `rows` sequences of at most `longest` positions run (a step's headroom
        included)."""
        return rows * _round_up(longest + 1, CAPACITY_STEP) * self.bytes_per_position()

    def _ensure(self, positions: int, rows: int) -> None:
        """Make the buffers hold at least `rows` slots of `positions` each; rows grow by doubling (up to `slots`),
        positions in CAPACITY_STEP steps. A reallocation copies the occupied part once."""
        if positions <= self.capacity and rows <= self.rows:
            return
        capacity = max(self.capacity, _round_up(positions, CAPACITY_STEP))
        new_rows = max(self.rows, min(self.slots, 1 << (rows - 1).bit_length()))
        key_shape = (new_rows, self.kv_heads, capacity, self.head_dim)
        value_shape = (new_rows, self.value_heads, capacity, self.value_dim)
        n, keep = self.occupied, self.capacity
        for i in range(self.num_layers):
            # Always ordinary tensors (never inference tensors, whichever mode the caller is in): a compiled
            # decode step guards on that, and buffers of either kind would compile twice.
            with torch.inference_mode(False):
                k = torch.zeros(key_shape, dtype=self.dtype, device=self.device)
                v = torch.zeros(value_shape, dtype=self.dtype, device=self.device)
            if i < len(self.keys):
                k[:n, :, :keep] = self.keys[i][:n]
                v[:n, :, :keep] = self.values[i][:n]
                self.keys[i], self.values[i] = k, v
            else:
                self.keys.append(k)
                self.values.append(v)
        self.capacity, self.rows = capacity, new_rows

    def reserve(self, capacity: int, rows: int) -> None:
        """Make the buffers hold at least `rows` slots of `capacity` positions (a compiled decode step's fixed
        shape: its batch bucket and its capacity)."""
        self._ensure(capacity, rows)

    def add(self, cache: DynamicCache) -> int:
        """Copy a sequence's cache (batch 1) into the next free slot; returns the slot."""
        if self.occupied >= self.slots:
            raise RuntimeError("no free slot")
        length = cache.get_seq_length()
        self._ensure(length + 1, self.occupied + 1)
        slot = self.occupied
        layers: list[Any] = list(cache.layers)  # DynamicLayer: keys and values [1, kv_heads, length, head_dim]
        for i, layer in enumerate(layers):
            if length:
                self.keys[i][slot, :, :length] = layer.keys[0]
                self.values[i][slot, :, :length] = layer.values[0]
        self.lengths.append(length)
        return slot

    def take(self, slot: int, config) -> DynamicCache:
        """A slot's positions as a batch-1 DynamicCache; the last row moves into the freed slot."""
        length = self.lengths[slot]
        cache = DynamicCache(config=config)
        for i in range(self.num_layers):  # update's torch.cat copies the slot's positions out of the buffers
            cache.update(self.keys[i][slot : slot + 1, :, :length], self.values[i][slot : slot + 1, :, :length], i)
        self.remove(slot)
        return cache

    def remove(self, slot: int) -> int | None:
        """Free a slot; returns the slot whose row moved into it (None if it was the last)."""
        last = self.occupied - 1
        moved = None
        if slot != last:
            length = self.lengths[last]
            for i in range(self.num_layers):
                self.keys[i][slot, :, :length] = self.keys[i][last, :, :length]
                self.values[i][slot, :, :length] = self.values[i][last, :, :length]
            self.lengths[slot] = length
            moved = last
        self.lengths.pop()
        return moved

    def clear(self) -> None:
        """Drop every row and give the buffers' memory back."""
        self.lengths = []
        self.keys, self.values, self.capacity, self.rows = [], [], 0, 0

    # ---- one decode step ----------------------------------------------------------------------------------

    def prepare_decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ([n, 1]) and the attention mask ([n, 1, 1, kv_len], True = attend) for one new token per
        occupied slot; after the forward, call `advance()`."""
        n = self.occupied
        longest = max(self.lengths)
        self._ensure(longest + 1, n)
        self._kv_len = longest + 1
        self._positions = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
        # Where each row writes. float32: a scatter index along the positions (faster than index_put on CPU: 3.7
        # against 8.2 us a write at one row; 80-120 against 180-420 us per layer at 16 rows on an older 2-core
        # machine). BF16/FP16: (rows, positions) for index_put, since CPU scatter_ in those dtypes copies the whole
        # buffer to float32 and back: 311 us against 11 a write at 16 rows over 512 positions (a third of an eager
        # 16-row INT4 step of SmolLM2 went there).
        if self.dtype == torch.float32:
            self._write_index = self._positions.view(n, 1, 1, 1).expand(n, self.kv_heads, 1, self.head_dim)
            self._value_write_index = self._positions.view(n, 1, 1, 1).expand(n, self.value_heads, 1, self.value_dim)
        else:
            self._write_index = self._value_write_index = None
            self._rows = torch.arange(n, device=self.device)
        mask = torch.arange(self._kv_len, device=self.device)[None, :] <= self._positions[:, None]
        return self._positions[:, None], mask[:, None, None, :]

    def advance(self) -> None:
        self.lengths = [length + 1 for length in self.lengths]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        n = key_states.shape[0]
        keys, values = self.keys[layer_idx][:n], self.values[layer_idx][:n]
        if self._write_index is not None and self._value_write_index is not None:
            keys.scatter_(2, self._write_index, key_states)
            values.scatter_(2, self._value_write_index, value_states)
        else:
            keys[self._rows, :, self._positions] = key_states[:, :, 0]
            values[self._rows, :, self._positions] = value_states[:, :, 0]
        return keys[:, :, : self._kv_len], values[:, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len - 1 if self._kv_len else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._kv_len - 1

    def __len__(self) -> int:
        return self.num_layers
