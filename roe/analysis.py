"""What roe learns about a model, once: routers and rules, attention windows, fan-out point, kernels.

Shapes: B prompts, K members, Q query rows of one forward.

A roster is this analysis plus one request's settings (roster size, schedule, seed, experts per
token). Everything here depends on the model only, costs forwards (the routers' tau = 0
self-test, the fan-out probes) or copies (the packed head), and is the same for every request,
so ``analyse(model)`` does it once and keeps it while the model lives; building a roster costs
no forward (the server, calibration, the bench and lm-eval build many).

- ``routers``: every MoE layer's router with the rule that reproduces it (roe/adapters), at the
  model's own experts per token. A roster takes copies (``slots``) to dial k and install on.
- ``windows`` / ``strategy``: the attention windows (roe/cache.py) decide whether members fold
  into one forward ("fold") or run as K copies of a recurrent state ("expand").
- ``fan_out(first)``: where decode steps can run the clean prefix once per prompt, for a schedule
  whose first noisy router is ``first`` (probed on first use, per ``first``).
- ``head()`` / ``small_m()``: the decode kernels (roe/kernels.py), packed on first use.

NOTE: the analysis is keyed on the model object and re-done when the model's routers are no
longer the analysed modules (module surgery); a change inside a router (its attributes, its
weights) is not seen: ``forget(model)`` drops the analysis. Nothing here knows about noise,
requests or rosters.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from roe import adapters
from roe.cache import CleanCache, attention_windows, member_masks
from roe.kernels import PackedHead, SmallM

_ANALYSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> ModelAnalysis


def positions_from_mask(mask_BS: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: real tokens count from 0; pads get 0."""
    return (mask_BS.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(eq=False)
class FanOut:
    """Where a decode step fans the clean prefix out to the K members.

    ``layers[start]`` is the first decoder layer with a noisy router; ``layer_axes`` holds where
    each input of a decoder layer carries the query rows. ``block`` (with ``block_axes``) is the
    first noisy MoE block when fanning out at its input gives the layer fan-out's result (the
    layer's attention then runs once per prompt too), else None.
    """

    layers: torch.nn.ModuleList
    start: int
    layer_axes: dict
    block: torch.nn.Module | None = None
    block_axes: dict | None = None

    @property
    def point(self) -> str:
        return "block" if self.block is not None else "layer"

    def forward(self, model, *, members: int, input_ids_B, position_B, masks_1, masks_K, cache,
                at_block: bool = True):
        """One model forward of one query row per prompt, widened to ``members`` rows at the fan-out
        point: pre-hooks repeat the hidden states and per-query inputs along their query axis and
        swap in the K-row masks (the caller's context carries any noise)."""
        K = members
        # id -> (original, replacement); holding the original keeps its id from being reused by a
        # later tensor of the same forward.
        swaps = {id(m1): (m1, mk) for m1, mk in zip(_mask_values(masks_1), _mask_values(masks_K), strict=True)}

        def widen(path: tuple, value: Any, axes: dict) -> Any:
            if isinstance(value, torch.Tensor):
                if id(value) in swaps:
                    return swaps[id(value)][1]
                axis = axes.get(path)
                if axis is None or value.shape[axis] == K:
                    return value
                shape = list(value.shape)
                shape[axis] = K
                wide = value.expand(shape).contiguous()
                swaps[id(value)] = (value, wide)
                return wide
            if isinstance(value, (tuple, list)):
                return type(value)(widen(path + (i,), v, axes) for i, v in enumerate(value))
            return value

        def hook_for(axes: dict):
            def hook(_module, args, kwargs):
                return widen(("args",), args, axes), {k: widen(("kwargs", k), v, axes) for k, v in kwargs.items()}
            return hook

        block = at_block and self.block is not None
        first = [(self.block, self.block_axes)] if block else [(self.layers[self.start], self.layer_axes)]
        later = [(layer, self.layer_axes) for layer in self.layers[self.start + 1:]]
        handles = [m.register_forward_pre_hook(hook_for(axes), with_kwargs=True) for m, axes in first + later]
        try:
            return model(input_ids=input_ids_B[:, None], position_ids=position_B[:, None], attention_mask=masks_1,
                         past_key_values=cache, use_cache=True, output_router_logits=False)
        finally:
            for handle in handles:
                handle.remove()


@dataclass(eq=False)
class ModelAnalysis:
    """The per-model facts a roster needs (see the module docstring).

    NOTE: it holds its model weakly: the cache of analyses is keyed on the model, and a strong
    reference from the value would keep every analysed model alive.
    """

    model_ref: weakref.ref
    routers: list[adapters.RouterSlot]
    windows: dict[str, int | None] | None
    mask_dtype: torch.dtype
    _fan_outs: dict[int, FanOut | None] = field(default_factory=dict, repr=False)
    _kernels: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def model(self):
        return self.model_ref()

    @property
    def strategy(self) -> str:
        """"fold" (members folded into one forward over one clean cache) or "expand" (recurrent state)."""
        return "fold" if self.windows is not None else "expand"

    @property
    def moe_layers(self) -> int:
        """MoE layers a schedule has an entry for: one per router the model records."""
        return len(self.routers)

    def slots(self) -> list[adapters.RouterSlot]:
        """Fresh copies of the routers, for one roster to dial and install its wrappers on."""
        return [copy.copy(slot) for slot in self.routers]

    def clean_prefix(self, first: int) -> tuple[torch.nn.ModuleList, int] | None:
        """The decoder layers and the index of the one holding router ``first``, when some come before it.

        Every layer before it computes the same thing for all members, so a decode step can run
        them once per prompt and fan the hidden states out to the K members there.
        """
        parts = self.routers[first].path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            parent = self.model.get_submodule(".".join(parts[:cut - 1])) if cut > 1 else self.model
            holder = getattr(parent, parts[cut - 1], None)
            if isinstance(holder, torch.nn.ModuleList) and parts[cut].isdigit():
                start = int(parts[cut])
                return (holder, start) if start > 0 else None
        return None

    def fan_out(self, first: int) -> FanOut | None:
        """The fan-out of decode steps whose first noisy router is ``first`` (probed once), or None."""
        if first not in self._fan_outs:
            self._fan_outs[first] = self._find_fan_out(first)
        return self._fan_outs[first]

    def _find_fan_out(self, first: int) -> FanOut | None:
        prefix = self.clean_prefix(first)
        if prefix is None or self.strategy != "fold":
            return None
        layers, start = prefix
        axes = self._query_axes(layers[start])
        if not axes:
            return None
        fan_out = FanOut(layers, start, axes)
        block = self._moe_block(first, layers[start])
        block_axes = self._query_axes(block) if block is not None else None
        at_block = replace(fan_out, block=block, block_axes=block_axes)
        return at_block if block_axes and self._block_agrees(at_block) else fan_out

    def _probe_cache(self) -> CleanCache:
        """A clean 2-token history whose next forward stores its first new position."""
        cache = CleanCache()
        prefix = torch.zeros(1, 2, dtype=torch.long)
        mask = torch.ones_like(prefix, dtype=torch.bool)
        with torch.no_grad():
            self.model(input_ids=prefix, attention_mask=mask.long(), position_ids=positions_from_mask(mask),
                       past_key_values=cache, use_cache=True, output_router_logits=False)
        return cache.storing(1)

    def _probe_masks(self, q: int):
        return member_masks(self.windows, torch.arange(2)[None], torch.ones(1, 2, dtype=torch.bool),
                            torch.full((1, q), 2), self.mask_dtype)

    def _query_axes(self, module: torch.nn.Module) -> dict[tuple, int | None] | None:
        """Where each input of ``module`` holds the query rows, found by probing.

        Two clean decode-like forwards (1 and 2 query rows over a stored 2-token history)
        capture the module's inputs; an input whose shape differs in exactly one axis holds the
        query rows there, one whose shape does not differ is shared. Returns None (no fan-out
        there) if some input changes in another way and is not one of the masks we pass in.
        """
        seen: list[tuple[dict, set[int]]] = []
        for q in (1, 2):
            cache, masks = self._probe_cache(), self._probe_masks(q)
            captured: dict[tuple, torch.Tensor] = {}

            def capture(_module, args, kwargs, into=captured):
                into.update(_leaves(("args",), args) | _leaves(("kwargs",), kwargs))

            handle = module.register_forward_pre_hook(capture, with_kwargs=True)
            try:
                with torch.no_grad():
                    self.model(input_ids=torch.zeros(1, q, dtype=torch.long), position_ids=torch.full((1, q), 2),
                               attention_mask=masks, past_key_values=cache, use_cache=True, output_router_logits=False)
            finally:
                handle.remove()
            seen.append((captured, {id(m) for m in _mask_values(masks)}))
        return _axes_between(*seen)

    def _moe_block(self, first: int, layer: torch.nn.Module) -> torch.nn.Module | None:
        """The module that calls router ``first`` (its MoE block) when it sits strictly inside its
        decoder layer: fanning out at its input runs that layer's attention once too."""
        router_path = self.routers[first].path
        block = self.model.get_submodule(router_path.rsplit(".", 1)[0]) if "." in router_path else None
        if block is None or block is layer or not any(m is block for m in layer.modules()):
            return None
        return block

    def _block_agrees(self, fan_out: FanOut) -> bool:
        """Fanning out at the block gives the layer fan-out's result: checked on a clean probe step
        of 2 members (both rows must agree), so a layer whose residual path cannot take the wider
        block output falls back to the layer."""
        logits = []
        for at_block in (True, False):
            try:
                with torch.no_grad():
                    out = fan_out.forward(self.model, members=2, input_ids_B=torch.zeros(1, dtype=torch.long),
                                          position_B=torch.tensor([2]), masks_1=self._probe_masks(1),
                                          masks_K=self._probe_masks(2), cache=self._probe_cache(), at_block=at_block)
            except (RuntimeError, ValueError, TypeError, IndexError):
                return False
            logits.append(out.logits)
        return logits[0].shape == logits[1].shape and torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-5)

    def head(self) -> PackedHead | None:
        """The packed LM head of decode steps (packed on first use, again if the head was replaced)."""
        packed = self._kernels.get("head", False)
        if packed is False or (packed is not None and packed.linear is not self.model.get_output_embeddings()):
            packed = self._kernels["head"] = PackedHead.for_model(self.model)
        return packed

    def small_m(self) -> SmallM | None:
        """The small-M kernel for the per-layer products of decode steps (found on first use); None
        where it does not apply or the environment's kernel is unavailable."""
        if "small_m" not in self._kernels:
            self._kernels["small_m"] = SmallM.for_model(self.model)
        small_m = self._kernels["small_m"]
        return small_m if small_m is not None and SmallM.extension() is not None else None


def analyse(model) -> ModelAnalysis:
    """The analysis of ``model``: computed on the first call, then read (see the module docstring).

    Raises ValueError for a model with no MoE layer or a router no rule reproduces (nothing is
    cached then, so the error repeats).
    """
    routers = adapters.find_routers(model)
    known = _ANALYSES.get(model)
    if known is not None and [(s.path, s.module) for s in known.routers] == [(s.path, s.module) for s in routers]:
        return known
    adapters.resolve_rules(model, routers)
    analysis = ModelAnalysis(model_ref=weakref.ref(model), routers=routers,
                             windows=attention_windows(model.config.get_text_config()),
                             mask_dtype=model.get_output_embeddings().weight.dtype)
    _ANALYSES[model] = analysis
    return analysis


def forget(model) -> None:
    """Drop the analysis of ``model`` (after changing a router in place); the next roster redoes it."""
    _ANALYSES.pop(model, None)


def num_moe_layers(model) -> int:
    """The MoE layers of ``model`` a schedule has one tau for (its analysed routers)."""
    return analyse(model).moe_layers


def _axes_between(one: tuple[dict, set[int]], two: tuple[dict, set[int]]) -> dict[tuple, int | None] | None:
    """The query axis of each captured input (None: shared), from a 1-row and a 2-row capture."""
    (one, masks_one), (two, masks_two) = one, two
    axes: dict[tuple, int | None] = {}
    for path, t1 in one.items():
        t2 = two.get(path)
        if id(t1) in masks_one and t2 is not None and id(t2) in masks_two:
            continue
        if t2 is None or t1.dim() != t2.dim():
            return None
        changed = [i for i, (a, b) in enumerate(zip(t1.shape, t2.shape, strict=True)) if a != b]
        if not changed:
            axes[path] = None
        elif len(changed) == 1 and t1.shape[changed[0]] == 1 and t2.shape[changed[0]] == 2:
            axes[path] = changed[0]
        else:
            return None
    return axes


def _leaves(path: tuple, value: Any) -> dict[tuple, torch.Tensor]:
    """The tensors inside nested tuples/lists/dicts, by path."""
    if isinstance(value, torch.Tensor):
        return {path: value}
    if isinstance(value, (tuple, list)):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(path + (i,), item).items()}
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _leaves(path + (name,), item).items()}
    return {}


def _mask_values(masks) -> list[torch.Tensor]:
    return list(masks.values()) if isinstance(masks, dict) else [masks]
