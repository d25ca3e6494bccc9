"""The clean KV cache and the attention masks of folded members.

Shapes: B prompts, K members, P stored positions, Q query rows of one forward, H heads, D head dim.

Members are folded into the *sequence* axis: a decode step feeds each prompt's current token K
times as one sequence of length K at the same position. Every member must see the stored clean
history and itself, never another member:

    mask[b, q, j] = keep   if j is a stored position with valid_b[j] and pos_b[j] < qpos_b[q]
                           (and pos_b[j] > qpos_b[q] - window on sliding-window layers)
                    keep   if j is query q's own new slot
                    block  otherwise

``CleanCache.storing(commit)`` stores only the first ``commit`` new positions of a forward
(member 0 comes first, so ``commit=1`` keeps the clean member's keys/values) and returns the
stored history plus all new positions to the attention. KV memory is therefore one sequence per
prompt whatever K is. Scoring uses ``commit=0``: the clean history was stored by the clean forward.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

ATTENTION_TYPES = ("full_attention", "sliding_attention")


class BufferLayer(DynamicLayer):
    """A cache layer stored in a buffer with spare capacity: appending writes in place.

    ``keys``/``values`` are views of the first ``length`` slots. ``append`` writes the new
    positions after them (growing the buffer by doubling when full), returns the view of
    history + new positions, and keeps the first ``commit`` of the new ones. The uncommitted
    slots are scratch: the next forward overwrites them. So a decode step copies only its K new
    rows, never the history (``DynamicLayer`` re-concatenates the whole history every step).
    """

    def __init__(self) -> None:
        super().__init__()
        self._keys = self._values = None
        self.length = 0

    @property
    def keys(self):
        return None if self._keys is None else self._keys[..., : self.length, :]

    @keys.setter
    def keys(self, tensor):
        self._keys = tensor
        self.length = 0 if tensor is None else tensor.shape[-2]

    @property
    def values(self):
        return None if self._values is None else self._values[..., : self.length, :]

    @values.setter
    def values(self, tensor):
        self._values = tensor

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def capacity(self) -> int:
        return 0 if self._keys is None else self._keys.shape[-2]

    def append(self, key_states, value_states, commit: int | None):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past, new = self.length, key_states.shape[-2]
        if self._keys is None or self._keys.shape[0] != key_states.shape[0]:
            if past:
                raise ValueError("the batch size of a cache cannot change between forwards")
            self._keys = self._values = None
        if past + new > self.capacity():
            size = max(past + new, 2 * self.capacity(), 64)
            keys = key_states.new_empty(key_states.shape[:-2] + (size, key_states.shape[-1]))
            values = value_states.new_empty(value_states.shape[:-2] + (size, value_states.shape[-1]))
            if past:
                keys[..., :past, :] = self._keys[..., :past, :]
                values[..., :past, :] = self._values[..., :past, :]
            self._keys, self._values = keys, values
        self._keys[..., past : past + new, :] = key_states
        self._values[..., past : past + new, :] = value_states
        out = self._keys[..., : past + new, :], self._values[..., : past + new, :]
        self.length = past + (new if commit is None else min(commit, new))
        return out

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def select(self, rows_B: torch.Tensor, start: int) -> None:
        """Keep the given batch rows and drop the first ``start`` stored positions (one copy)."""
        if self._keys is not None:
            self._keys, self._values = self._keys[rows_B, :, start:], self._values[rows_B, :, start:]
            self.length -= start


class CleanCache(Cache):
    """A cache whose ``update`` keeps the clean history only.

    A cache made with ``CleanCache()`` stores every position of a forward (a clean prefill).
    ``cache.storing(n)`` is the same stored history for a forward that keeps only its first n
    new positions (``n=1``: the clean member of a decode step; ``n=0``: nothing, scoring). The
    commit is thus an argument of each forward (the ``past_key_values`` it is given), never a
    mode set on the shared cache.
    """

    def __init__(self, *, commit: int | None = None, layers: list[BufferLayer] | None = None) -> None:
        super().__init__(layer_class_to_replicate=BufferLayer)
        self._commit = commit
        if layers is not None:
            self.layers = layers  # shared: a view of another cache's history

    @property
    def commit(self) -> int | None:
        """New positions each forward stores (None: all)."""
        return self._commit

    def storing(self, commit: int | None) -> CleanCache:
        """This cache's history (shared, not copied), for a forward that stores its first ``commit`` new positions."""
        return CleanCache(commit=commit, layers=self.layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(BufferLayer())
        return self.layers[layer_idx].append(key_states, value_states, self._commit)

    def kv_bytes(self) -> int:
        """Bytes of the stored keys and values (the clean history; buffers keep spare capacity)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized and layer.length
                   for t in (layer.keys, layer.values))

    def select(self, rows_B: torch.Tensor, start: int) -> None:
        """Keep the given batch rows (drop finished prompts) and the stored positions from ``start`` on."""
        for layer in self.layers:
            layer.select(rows_B, start)

    @classmethod
    def left_padded(cls, caches: list[CleanCache], lengths: list[int], batches: list[int] | None = None) -> CleanCache:
        """Stack caches of different lengths into one batch, right-aligned (left padding).

        Each cache holds ``batches[i]`` rows (default 1) of ``lengths[i]`` stored positions; a cache
        of length 0 may hold no layers. A running batch and newly prefilled prompts merge this way.
        """
        batches = batches if batches is not None else [1] * len(caches)
        batch = cls()
        width = max(lengths, default=0)
        if width == 0:
            return batch
        first_B = [sum(batches[:i]) for i in range(len(batches))]
        num_layers = max(len(c.layers) for c in caches)
        for layer_idx in range(num_layers):
            ref = next(c.layers[layer_idx] for c, n in zip(caches, lengths) if n > 0)
            shape = (sum(batches), ref.keys.shape[1], width, ref.keys.shape[-1])
            keys = ref.keys.new_zeros(shape)
            values = ref.values.new_zeros(shape[:-1] + (ref.values.shape[-1],))
            for cache, n, first, rows in zip(caches, lengths, first_B, batches, strict=True):
                if n > 0:
                    keys[first : first + rows, :, width - n:] = cache.layers[layer_idx].keys
                    values[first : first + rows, :, width - n:] = cache.layers[layer_idx].values
            layer = BufferLayer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            batch.layers.append(layer)
        return batch


def attention_windows(config) -> dict[str, int | None] | None:
    """Window of each attention type the model uses (None = full causal attention).

    Returns None when some layers are not softmax attention (linear attention, Mamba, ...):
    their state cannot hold members side by side, so such models cannot fold.
    """
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return {"full_attention": window}
    if set(layer_types) - set(ATTENTION_TYPES):
        return None
    return {t: (window if t == "sliding_attention" else None) for t in dict.fromkeys(layer_types)}


def member_mask(past_pos_BP: torch.Tensor, past_valid_BP: torch.Tensor, query_pos_BQ: torch.Tensor,
                window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, Q, P + Q]: the clean past before each query's position, and itself."""
    before_BQP = past_pos_BP[:, None, :] < query_pos_BQ[:, :, None]
    keep_BQP = past_valid_BP[:, None, :] & before_BQP
    if window is not None:
        keep_BQP &= past_pos_BP[:, None, :] > query_pos_BQ[:, :, None] - window
    B, Q = query_pos_BQ.shape
    own_BQQ = torch.eye(Q, dtype=torch.bool, device=query_pos_BQ.device).expand(B, Q, Q)
    keep = torch.cat([keep_BQP, own_BQQ], dim=-1)
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)[:, None]


def member_masks(windows: dict[str, int | None], past_pos_BP, past_valid_BP, query_pos_BQ, dtype):
    """One mask, or a {layer type: mask} dict when the model mixes attention types."""
    masks = {t: member_mask(past_pos_BP, past_valid_BP, query_pos_BQ, w, dtype) for t, w in windows.items()}
    return next(iter(masks.values())) if len(masks) == 1 else masks


def first_member(masks, stored: int):
    """The masks of one query row per prompt, cut from K-row ``member_masks`` over ``stored`` slots.

    Row 0 sees the same stored positions and its own slot, which is the first new one.
    """
    if isinstance(masks, dict):
        return {t: m[..., :1, : stored + 1] for t, m in masks.items()}
    return masks[..., :1, : stored + 1]
