"""The clean KV cache and the attention masks of folded members.

Shapes: B prompts, K members, P stored positions, Q query rows of one forward, H heads, D head dim.

Members are folded into the *sequence* axis: a decode step feeds each prompt's current token K
times as one sequence of length K at the same position. Every member must see the stored clean
history and itself, never another member:

    mask[b, q, j] = keep   if j is a stored position with valid_b[j] and pos_b[j] < qpos_b[q]
                           (and pos_b[j] > qpos_b[q] - window on sliding-window layers)
                    keep   if j is query q's own new slot
                    block  otherwise

``CleanCache`` stores only the first ``commit`` new positions of a forward (member 0 comes
first, so ``commit=1`` keeps the clean member's keys/values) and returns the stored history plus
all new positions to the attention. KV memory is therefore one sequence per prompt whatever K
is. Scoring uses ``commit=0``: the clean history was stored by the clean forward.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

ATTENTION_TYPES = ("full_attention", "sliding_attention")


class CleanCache(Cache):
    """A cache whose ``update`` keeps the clean history only.

    ``commit=None`` stores everything (a clean prefill); ``commit=n`` stores the first n new
    positions of each forward; ``commit=0`` stores nothing.
    """

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=DynamicLayer)
        self.commit: int | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.commit is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        while len(self.layers) <= layer_idx:
            self.layers.append(DynamicLayer())
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        past = layer.get_seq_length()
        keys = torch.cat([layer.keys, key_states], dim=-2) if past else key_states
        values = torch.cat([layer.values, value_states], dim=-2) if past else value_states
        if self.commit:
            layer.keys = keys[..., : past + self.commit, :].clone()
            layer.values = values[..., : past + self.commit, :].clone()
        return keys, values

    def kv_bytes(self) -> int:
        """Bytes of stored keys and values."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))

    @classmethod
    def left_padded(cls, caches: list[CleanCache], lengths: list[int]) -> CleanCache:
        """Stack batch-1 caches of different lengths into one batch, right-aligned (left padding)."""
        batch = cls()
        width = max(lengths)
        if width == 0:
            return batch
        num_layers = max(len(c.layers) for c in caches)
        for layer_idx in range(num_layers):
            ref = next(c.layers[layer_idx] for c, n in zip(caches, lengths) if n > 0)
            shape = (len(caches), ref.keys.shape[1], width, ref.keys.shape[-1])
            keys = ref.keys.new_zeros(shape)
            values = ref.values.new_zeros(shape[:-1] + (ref.values.shape[-1],))
            for b, (cache, n) in enumerate(zip(caches, lengths)):
                if n > 0:
                    keys[b, :, width - n:] = cache.layers[layer_idx].keys[0]
                    values[b, :, width - n:] = cache.layers[layer_idx].values[0]
            layer = DynamicLayer()
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
