"""roster(): install RoE on a model, own the member row layout, and score teacher-forced text.

Shapes: B prompts, K members, S positions, Q query rows of one forward, V vocab, L MoE layers.

``roster(model, cfg)`` validates everything before any compute and finds and self-tests the
routers (roe/adapters). Entering its ``with`` block replaces each router instance's ``forward``
by a wrapper that re-selects experts when the current forward carries a ``NoisePlan``; leaving
it (also through an exception) deletes the wrappers: the model's modules, parameters and buffers
are exactly as before, and the roster is closed (using it raises). A roster used without a
``with`` block installs its wrappers for each call and removes them after it.

Row layout: a forward sees B x Q rows, batch-major. ``forward`` takes the member and position
of every row; member 0 is clean. ``score`` is generation's semantics at every position at
once: a clean forward stores the clean history and gives member 0; the noisy members of all
positions then run in a few folded forwards, each query row seeing the clean history before
its position plus itself (roe/cache.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import cached_property
from typing import Any

import torch

from roe import adapters
from roe.aggregate import AGGREGATORS
from roe.cache import CleanCache, attention_windows, member_masks
from roe.config import RoEConfig
from roe.kernels import PackedHead, SmallM
from roe.routing import NoiseBank, NoisePlan
from roe.schedule import Schedule, model_default_schedule, model_fingerprint

SCORE_ROWS = 4096  # query rows per folded scoring forward (bounds the mask and logits memory)
FOLD_KEYS = 512  # folding M members makes each query attend over S * (1 + M) keys: keep that small


def check_model(model) -> None:
    """A transformers causal LM, not a base model or an encoder."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"roe.roster needs a transformers PreTrainedModel, got {type(model).__name__}")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise TypeError(f"{type(model).__name__} is not a causal language model (it has no LM head); "
                        "load it with AutoModelForCausalLM")
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError(f"{type(model).__name__} is an encoder-decoder model; roe supports decoder-only causal LMs")


def positions_from_mask(mask_BS: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: real tokens count from 0; pads get 0."""
    return (mask_BS.long().cumsum(-1) - 1).clamp(min=0)


def check_inputs(input_ids, attention_mask) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.dim() != 2:
        raise TypeError("input_ids must be a LongTensor of shape (batch, seq)")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.bool()
    if (mask[:, :-1] & ~mask[:, 1:]).any():
        raise ValueError("attention_mask must use left padding (zeros before the tokens, none after)")
    if not mask.any(dim=1).all():
        raise ValueError("every row needs at least one token (a row of attention_mask is all zeros)")
    return mask


CLOSED = ("this roster was closed when its `with` block ended (the model is restored); open a new one: "
          "`with roe.roster(model, cfg) as r: r.generate(...)`")


class Roster:
    """RoE on a model: ``with roe.roster(model, cfg) as r:`` (see the module docstring)."""

    def __init__(self, model, cfg: RoEConfig, *, kernels: bool = True) -> None:
        if not isinstance(cfg, RoEConfig):
            raise TypeError(f"cfg must be a roe.RoEConfig, got {type(cfg).__name__}")
        check_model(model)
        self.model, self.cfg, self.kernels = model, cfg, kernels
        self.text_config = model.config.get_text_config()
        self.slots = adapters.find_routers(model)
        self.schedule = schedule_for(model, cfg, self.slots)
        self.windows = attention_windows(self.text_config)
        self.strategy = "fold" if self.windows is not None else "expand"
        self.mask_dtype = model.get_output_embeddings().weight.dtype
        adapters.resolve_rules(model, self.slots)
        adapters.dial(model, self.slots, cfg.experts_per_token)
        self.plan: NoisePlan | None = None
        self.tau_L = self.schedule.tau
        self.clean_prefix = self._clean_prefix()
        self._axes: dict[tuple, int | None] | None = None  # found on first use (_query_axes)
        self._block: tuple[torch.nn.Module, dict] | None = None  # found with them (_block_fan_out)
        self.installed = self.closed = False
        self._check_dial()

    def _check_dial(self) -> None:
        """With ``experts_per_token`` changing k, one short forward must run: a model whose blocks
        cannot take another k (LongCat-Flash at k = 1 fails in transformers itself) is refused here."""
        if not any(slot.dialled for slot in self.slots):
            return
        self._check_stacking()
        ids = torch.zeros(1, 4, dtype=torch.long, device=self.model.device)
        try:
            with torch.no_grad(), self._in_use():
                self.model(input_ids=ids, use_cache=False)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise ValueError(f"{type(self.model).__name__} does not run with experts_per_token="
                             f"{self.cfg.experts_per_token}: {type(err).__name__}: {err}") from err

    def __enter__(self) -> Roster:
        if self.closed or self.installed:
            raise RuntimeError("a roster opens once; " + CLOSED.split("; ", 1)[1])
        self._install()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        """The wrappers for one call: already there inside the ``with`` block, else installed for it."""
        if self.closed:
            raise RuntimeError(CLOSED)
        if self.installed:
            yield
            return
        self._install()
        try:
            yield
        finally:
            self._uninstall()

    @property
    def first_noisy_path(self) -> str | None:
        """Module path of the first router with tau > 0 (None when the schedule is clean)."""
        return next((s.path for s, tau in zip(self.slots, self.tau_L, strict=True) if tau > 0), None)

    def _clean_prefix(self) -> tuple[torch.nn.ModuleList, int] | None:
        """The decoder layers and the index of the first one with a noisy router, when some come before it.

        Every layer before it computes the same thing for all members, so a decode step can run
        them once per prompt and fan the hidden states out to the K members there (``fan_out``).
        """
        if self.first_noisy_path is None:
            return None
        parts = self.first_noisy_path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            parent = self.model.get_submodule(".".join(parts[:cut - 1])) if cut > 1 else self.model
            holder = getattr(parent, parts[cut - 1], None)
            if isinstance(holder, torch.nn.ModuleList) and parts[cut].isdigit():
                start = int(parts[cut])
                return (holder, start) if start > 0 else None
        return None

    @property
    def members(self) -> int:
        """Members actually computed: with no noisy layer every member equals the clean one."""
        return 1 if self.schedule.is_clean else self.cfg.roster_size

    @property
    def aggregator(self):
        return AGGREGATORS[self.cfg.aggregator]

    def combine(self, logits, dim: int) -> torch.Tensor:
        """Aggregate member logits held along ``dim`` into log-probs."""
        return self.aggregator.from_logits(logits, dim)

    def _install(self) -> None:
        self._check_stacking()
        for slot in self.slots:
            original = slot.module.forward

            def forward(*args, _slot=slot, _original=original, **kwargs):
                output = _original(*args, **kwargs)
                plan = self.plan
                if plan is None and not _slot.dialled:
                    return output
                logits_TE = _slot.rule.logits(_slot.module, output)
                noise_TE = None if plan is None else plan.noise(_slot.layer, logits_TE)
                if noise_TE is None:
                    if not _slot.dialled:
                        return output
                    noise_TE = torch.zeros_like(logits_TE)  # experts_per_token: clean rows re-select too
                noisy = plan is not None and plan.noisy_weights
                return _slot.rule.reroute(_slot.module, output, noise_TE, noisy, args, kwargs)

            forward.roe_dialled = slot.dialled  # read by _check_stacking
            slot.saved_forward = slot.module.__dict__.get("forward")
            slot.module.forward = forward
        self.installed = True

    def _check_stacking(self) -> None:
        """Rosters open on one model at once wrap each other's routers. A dialled wrapper re-selects
        every forward's clean rows, also those of the other roster, so it cannot share the model."""
        for slot in self.slots:
            other = slot.module.__dict__.get("forward")
            if other is not None and (slot.dialled or getattr(other, "roe_dialled", False)):
                raise RuntimeError("a roster with experts_per_token cannot be open on a model together with another "
                                   "roster; close the other one first")

    def _uninstall(self) -> None:
        """Remove the wrappers (and restore any instance forward that was there)."""
        for slot in self.slots:
            if slot.saved_forward is None:
                slot.module.__dict__.pop("forward", None)
            else:
                slot.module.forward = slot.saved_forward
        self.installed = False
        self.plan = None

    def close(self) -> None:
        """Uninstall if installed; the roster cannot be used afterwards."""
        if self.installed:
            self._uninstall()
        self.closed = True

    def _plan(self, member_BQ: torch.Tensor, position_BQ: torch.Tensor, bank: NoiseBank | None,
              seed_BQ: torch.Tensor | None = None) -> NoisePlan | None:
        """The noise of a forward's rows (seeded by ``cfg.seed``, or per row by ``seed_BQ``); None when
        every row is the clean member (nothing to draw)."""
        if not bool((member_BQ != 0).any()):
            return None
        seed = self.cfg.seed if seed_BQ is None else seed_BQ.expand_as(member_BQ).reshape(-1)
        return NoisePlan.for_rows(seed=seed, member_T=member_BQ.reshape(-1),
                                  position_T=position_BQ.reshape(-1), tau_L=self.tau_L,
                                  noisy_weights=self.cfg.noisy_weights, bank=bank)

    def noise_bank(self) -> NoiseBank:
        """A fresh bank of noise drawn ahead, for the decode steps of one generation."""
        return NoiseBank(self.cfg.seed, self.members)

    def forward(self, *, member_BQ: torch.Tensor, position_BQ: torch.Tensor, bank: NoiseBank | None = None,
                seed_BQ: torch.Tensor | None = None, **model_kwargs):
        """One model forward whose rows carry (member, position); member 0 rows stay clean.

        ``bank`` (from ``noise_bank()``) serves decode steps' noise from draws made ahead.
        ``seed_BQ`` gives each row its own noise seed (rows of requests with different seeds);
        without it every row uses ``cfg.seed``.
        """
        with self._in_use():
            self.plan = self._plan(member_BQ, position_BQ, bank, seed_BQ)
            try:
                model_kwargs.setdefault("use_cache", True)
                return self.model(position_ids=position_BQ, output_router_logits=False, **model_kwargs)
            finally:
                self.plan = None

    def _probe_cache(self) -> CleanCache:
        """A clean 2-token history that keeps the first new position of the next forward."""
        cache = CleanCache()
        prefix = torch.zeros(1, 2, dtype=torch.long)
        self.clean_forward(prefix, torch.ones_like(prefix, dtype=torch.bool), cache)
        cache.commit = 1
        return cache

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
        (one, masks_one), (two, masks_two) = seen
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

    def _moe_block(self) -> torch.nn.Module | None:
        """The module that calls the first noisy router (its MoE block) when it sits strictly inside
        the first noisy decoder layer: fanning out at its input runs that layer's attention once too."""
        layers, start = self.clean_prefix
        router_path = self.first_noisy_path
        block = self.model.get_submodule(router_path.rsplit(".", 1)[0]) if "." in router_path else None
        layer = layers[start]
        if block is None or block is layer or not any(m is block for m in layer.modules()):
            return None
        return block

    def _block_fan_out(self) -> tuple[torch.nn.Module, dict] | None:
        """(MoE block, its query axes) when fanning out at the block gives the layer fan-out's
        result: checked on a clean probe step of 2 members (both rows must equal the layer
        fan-out's), so a layer whose residual path cannot take the wider block output falls back."""
        block = self._moe_block()
        axes = self._query_axes(block) if block is not None else None
        if not axes:
            return None
        member_BK, position_B = torch.zeros(1, 2, dtype=torch.long), torch.tensor([2])
        ids_B = torch.zeros(1, dtype=torch.long)
        logits = []
        for at in ((block, axes), None):
            try:
                with torch.no_grad():
                    out = self._fan_out(member_BK=member_BK, position_B=position_B, input_ids_B=ids_B,
                                        masks_1=self._probe_masks(1), masks_K=self._probe_masks(2),
                                        cache=self._probe_cache(), bank=None, block=at)
            except (RuntimeError, ValueError, TypeError, IndexError):
                return None
            logits.append(out.logits)
        ok = logits[0].shape == logits[1].shape and torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-5)
        return (block, axes) if ok else None

    def fan_out_forward(self, *, member_BK: torch.Tensor, position_B: torch.Tensor, input_ids_B: torch.Tensor,
                        masks_1, masks_K, cache: CleanCache, bank: NoiseBank | None = None,
                        seed_B: torch.Tensor | None = None):
        """A decode step that runs the clean prefix once per prompt, then the K members.

        The model sees one query row per prompt (``masks_1``). The clean prefix is every layer
        before the first one with a noisy router and, when the check of ``_block_fan_out``
        passes, that layer's attention too: a pre-hook on its MoE block (else on the layer)
        repeats the hidden states and per-query inputs to the K member rows (the query axis of
        each input found by ``_query_axes``), and pre-hooks on the later layers do the same
        and swap in the K-row masks. The clean prefix is identical for all members, so the
        result equals ``forward`` on K rows while the prefix costs 1/K. ``seed_B``: one noise seed
        per prompt (default ``cfg.seed``).
        """
        if not self.can_fan_out:
            raise RuntimeError("fan-out is not available for this model")
        with self._in_use():
            return self._fan_out(member_BK=member_BK, position_B=position_B, input_ids_B=input_ids_B,
                                 masks_1=masks_1, masks_K=masks_K, cache=cache, bank=bank, block=self._block,
                                 seed_B=seed_B)

    def _fan_out(self, *, member_BK, position_B, input_ids_B, masks_1, masks_K, cache, bank, block, seed_B=None):
        layers, start = self.clean_prefix
        B, K = member_BK.shape
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

        first = [block] if block is not None else [(layers[start], self._axes)]
        later = [(layer, self._axes) for layer in layers[start + 1:]]
        handles = [m.register_forward_pre_hook(hook_for(axes), with_kwargs=True) for m, axes in first + later]
        seed_BK = None if seed_B is None else seed_B[:, None].expand(B, K)
        self.plan = self._plan(member_BK, position_B[:, None].expand(B, K), bank, seed_BK)
        try:
            return self.model(input_ids=input_ids_B[:, None], position_ids=position_B[:, None], attention_mask=masks_1,
                              past_key_values=cache, use_cache=True, output_router_logits=False)
        finally:
            self.plan = None
            for handle in handles:
                handle.remove()

    @cached_property
    def _head(self) -> PackedHead | None:
        """The packed LM head of decode steps, packed on first use; None for one member."""
        return PackedHead.for_model(self.model) if self.members > 1 else None

    @cached_property
    def _small_m(self) -> SmallM | None:
        """The small-M kernel for the per-layer products of decode steps; None for one member."""
        return SmallM.for_model(self.model) if self.members > 1 else None

    @contextmanager
    def decode_kernels(self) -> Iterator[None]:
        """Faster products for the K rows of a decode step (roe/kernels.py); none when K = 1.

        With one member the model runs untouched, so K = 1 reproduces it bit for bit. None when
        the roster was made with ``kernels=False``. Nor with
        autograd on: neither kernel has a backward, and on inputs that require grad the oneDNN
        head took about 60 ms instead of 0.3 (measured); the decoders' callers all run under no_grad.
        """
        if self.members == 1 or not self.kernels or torch.is_grad_enabled():
            yield
            return
        with ExitStack() as stack:
            for kernel in (self._head, self._small_m):
                if kernel is not None:
                    stack.enter_context(kernel.installed())
            yield

    @property
    def can_fan_out(self) -> bool:
        """True when decode steps can run the clean prefix layers once (see ``fan_out_forward``)."""
        if self.clean_prefix is None or self.strategy != "fold":
            return False
        if self._axes is None:
            layers, start = self.clean_prefix
            self._axes = self._query_axes(layers[start]) or {}
            self._block = self._block_fan_out() if self._axes else None
        return bool(self._axes)

    @property
    def fan_out_point(self) -> str | None:
        """Where decode steps fan out: "block" (the first noisy MoE block), "layer", or None."""
        if not self.can_fan_out:
            return None
        return "block" if self._block is not None else "layer"

    def clean_forward(self, input_ids, mask_BS, cache: CleanCache):
        """The clean member on (left-padded) rows, storing every position in ``cache`` (the untouched
        model unless ``experts_per_token`` dials k: installed for the call like ``forward``)."""
        cache.commit = None
        with self._in_use():
            return self.model(input_ids=input_ids, attention_mask=mask_BS.long(),
                              position_ids=positions_from_mask(mask_BS), past_key_values=cache, use_cache=True,
                              output_router_logits=False)

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 64, **kwargs) -> torch.Tensor:
        """RoE generation; see ``roe.engine.generate`` for the options."""
        from roe.engine import generate

        with self._in_use():
            return generate(self, input_ids, attention_mask, max_new_tokens, **kwargs)

    @torch.no_grad()
    def score(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Teacher-forced RoE log-probs [B, S, V]: position t is the distribution of token t + 1.

        Position t equals what ``generate`` computes at the step that feeds token t given the
        prefix (clean history, noisy current token), member for member and noise for noise.
        """
        with self._in_use():
            return self._score(input_ids, check_inputs(input_ids, attention_mask))

    def _score(self, input_ids, mask_BS) -> torch.Tensor:
        if self.strategy == "expand" and self.members > 1:
            from roe.engine import score_stepwise

            return score_stepwise(self, input_ids, mask_BS)
        agg = self.aggregator
        state = None
        for logits in self._member_logits(input_ids, mask_BS):  # [B, M, S, V], clean member first
            part = agg.partial(torch.log_softmax(logits.float(), dim=-1), dim=1)
            state = part if state is None else agg.merge(state, part)
        return agg.finish(state, self.members)

    @torch.no_grad()
    def target_logprobs(self, input_ids, targets, attention_mask=None) -> torch.Tensor:
        """log p(targets[b, t] | input_ids[b, :t + 1]) under RoE, [B, S]: ``score`` at the given tokens.

        For the mean-prob aggregator this never builds the aggregated [B, S, V] distribution
        (each member contributes logit[target] - logsumexp(logits)); it is what perplexity and
        calibration need. Other aggregators and hybrid models go through ``score``.
        """
        with self._in_use():
            return self._target_logprobs(input_ids, targets, attention_mask)

    def _target_logprobs(self, input_ids, targets, attention_mask) -> torch.Tensor:
        mask_BS = check_inputs(input_ids, attention_mask)
        if not isinstance(targets, torch.Tensor) or targets.shape != input_ids.shape:
            raise ValueError(f"targets must be a tensor of the shape of input_ids {tuple(input_ids.shape)}")
        targets = targets.long()
        if self.cfg.aggregator != "mean-prob" or (self.strategy == "expand" and self.members > 1):
            return self.score(input_ids, attention_mask).gather(-1, targets[..., None])[..., 0]
        state = None
        for logits in self._member_logits(input_ids, mask_BS):
            part = torch.logsumexp(target_logprob(logits, targets[:, None].expand(logits.shape[:3])), dim=1)
            state = part if state is None else torch.logaddexp(state, part)
        return state - math.log(self.members)

    def _member_logits(self, input_ids, mask_BS) -> Iterator[torch.Tensor]:
        """Logits [B, M, S, V] of all members, in chunks: the clean forward (member 0) first, then
        the noisy members folded against the clean history it stored."""
        if self.members == 1:  # the untouched model, without a cache (MiniMax accepts only its own)
            yield self.model(input_ids=input_ids, attention_mask=mask_BS.long(),
                             position_ids=positions_from_mask(mask_BS), use_cache=False).logits[:, None]
            return
        cache = CleanCache()
        yield self.clean_forward(input_ids, mask_BS, cache).logits[:, None]
        B, S = input_ids.shape
        pos_BS = positions_from_mask(mask_BS)
        chunk = max(1, min(SCORE_ROWS // (B * S), FOLD_KEYS // S - 1))
        cache.commit = 0
        for first in range(1, self.members, chunk):
            members = torch.arange(first, min(first + chunk, self.members))
            yield self._score_members(input_ids, pos_BS, mask_BS, members, cache)

    def _score_members(self, input_ids, pos_BS, mask_BS, members, cache) -> torch.Tensor:
        """Logits [B, M, S, V] of members M at every position, against the clean history."""
        B, S = input_ids.shape
        M = len(members)
        ids_BQ = input_ids.repeat(1, M)
        pos_BQ = pos_BS.repeat(1, M)
        member_BQ = members.repeat_interleave(S).expand(B, -1)
        masks = member_masks(self.windows, pos_BS, mask_BS, pos_BQ, self.mask_dtype)
        logits = self.forward(member_BQ=member_BQ, position_BQ=pos_BQ, input_ids=ids_BQ,
                              attention_mask=masks, past_key_values=cache).logits
        return logits.view(B, M, S, -1)


def schedule_for(model, cfg: RoEConfig, slots: list | None = None) -> Schedule:
    """``cfg``'s schedule for ``model``: one tau per MoE layer, made for this architecture.

    ``tau=None`` resolves to the model's default: the ``schedule.json`` of the directory it was
    loaded from (``model.name_or_path``), else uniform 0.1 (roe/schedule.py). Raises ValueError
    for another layer count or a schedule calibrated for another model. ``slots`` (the model's
    routers) saves finding them again.
    """
    shipped = model_default_schedule(getattr(model, "name_or_path", None)) if cfg.tau is None else None
    schedule = cfg.schedule(len(slots if slots is not None else adapters.find_routers(model)), shipped)
    schedule.check_model(model_fingerprint(model))
    return schedule


def roster(model, cfg: RoEConfig | None = None, *, kernels: bool = True) -> Roster:
    """RoE on ``model``: ``with roe.roster(model, cfg) as r: r.generate(...)``.

    Everything is validated here, before any compute. Inside the ``with`` block RoE is installed;
    on exit the model is exactly as before and the roster is closed (using it raises). Used
    without a ``with`` block, each call installs RoE for its duration. ``kernels=False`` keeps
    the model's own products in decode steps (no packed head, no compiled small-M kernel).
    """
    return Roster(model, cfg if cfg is not None else RoEConfig(), kernels=kernels)


def target_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for every position, without the full log-softmax: [...]."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)


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
