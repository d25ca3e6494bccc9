"""A model's analysis plus one request's settings: the forwards whose rows are roster members.

Shapes: B prompts, K members, Q query rows of one forward, S positions.

``Members(model, cfg)`` reads the model's analysis (roe/analysis.py, computed once per model),
copies its routers and dials them to ``cfg.experts_per_token``, and resolves the schedule: no
forward runs unless the dial needs its one check. Its forwards take the member and position of
every row (member 0 is clean) and run the model inside the routing context of its router patch
(roe/patch.py) with the rows' noise plan:

- ``forward``: any rows (folded scoring, the expanded decoder, the slow reference);
- ``fan_out_forward``: a decode step that runs the clean prefix once per prompt (roe/analysis.py
  ``FanOut``);
- ``clean_forward``: member 0 on left-padded prompts, storing every position in a clean cache.

The wrappers are installed for each call, or once for a ``with`` block (roe/roster.py). This
module knows nothing about decoding loops, scoring or aggregation beyond ``combine``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from roe import adapters
from roe.aggregate import AGGREGATORS
from roe.analysis import FanOut, analyse, num_moe_layers, positions_from_mask
from roe.cache import CleanCache
from roe.config import RoEConfig
from roe.kernels import PackedHead, SmallM
from roe.patch import RouterPatch, routing
from roe.routing import NoiseBank, NoisePlan
from roe.schedule import Schedule, model_default_schedule, model_fingerprint

CLOSED = ("this roster was closed when its `with` block ended (the model is restored); open a new one: "
          "`with roe.roster(model, cfg) as r: r.generate(...)`")


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


def schedule_for(model, cfg: RoEConfig, slots: list | None = None) -> Schedule:
    """``cfg``'s schedule for ``model``: one tau per MoE layer, made for this architecture.

    ``tau=None`` resolves to the model's default: the ``schedule.json`` of the directory it was
    loaded from (``model.name_or_path``), else uniform 0.1 (roe/schedule.py). Raises ValueError
    for another layer count or a schedule calibrated for another model. ``slots`` (the model's
    routers) saves finding them again.
    """
    shipped = model_default_schedule(getattr(model, "name_or_path", None)) if cfg.tau is None else None
    schedule = cfg.schedule(len(slots) if slots is not None else num_moe_layers(model), shipped)
    schedule.check_model(model_fingerprint(model))
    return schedule


class Members:
    """The member forwards of one roster setting on a model (see the module docstring)."""

    def __init__(self, model, cfg: RoEConfig) -> None:
        if not isinstance(cfg, RoEConfig):
            raise TypeError(f"cfg must be a roe.RoEConfig, got {type(cfg).__name__}")
        check_model(model)
        self.model, self.cfg = model, cfg
        self.analysis = analyse(model)
        self.slots = self.analysis.slots()
        self.schedule = schedule_for(model, cfg, self.slots)
        self.patch = RouterPatch(self.slots)
        self.patch.check_stacking()  # a dialled roster open on the model: its k would reach this one's forwards
        adapters.dial(model, self.slots, cfg.experts_per_token)
        self.tau_L = self.schedule.tau
        self.closed = False
        self._check_dial()

    text_config = property(lambda self: self.model.config.get_text_config())
    windows = property(lambda self: self.analysis.windows)
    strategy = property(lambda self: self.analysis.strategy)
    mask_dtype = property(lambda self: self.analysis.mask_dtype)
    installed = property(lambda self: self.patch.installed)

    def _check_dial(self) -> None:
        """With ``experts_per_token`` changing k, one short forward must run: a model whose blocks
        cannot take another k (LongCat-Flash at k = 1 fails in transformers itself) is refused here."""
        if not self.patch.dialled:
            return
        self.patch.check_stacking()
        ids = torch.zeros(1, 4, dtype=torch.long, device=self.model.device)
        try:
            with torch.no_grad(), self._in_use():
                self.model(input_ids=ids, use_cache=False)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise ValueError(f"{type(self.model).__name__} does not run with experts_per_token="
                             f"{self.cfg.experts_per_token}: {type(err).__name__}: {err}") from err

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        """The wrappers for one call: already there inside the ``with`` block, else installed for it."""
        if self.closed:
            raise RuntimeError(CLOSED)
        if self.patch.installed:
            yield
            return
        self.patch.install()
        try:
            yield
        finally:
            self.patch.uninstall()

    def close(self) -> None:
        """Uninstall if installed; the roster cannot be used afterwards."""
        if self.patch.installed:
            self.patch.uninstall()
        self.closed = True

    @property
    def first_noisy(self) -> int | None:
        """MoE index of the first router with tau > 0 (None when the schedule is clean)."""
        return next((i for i, tau in enumerate(self.tau_L) if tau > 0), None)

    @property
    def first_noisy_path(self) -> str | None:
        """Module path of the first router with tau > 0 (None when the schedule is clean)."""
        first = self.first_noisy
        return None if first is None else self.slots[first].path

    @property
    def clean_prefix(self) -> tuple[torch.nn.ModuleList, int] | None:
        """The decoder layers and the index of the first one with a noisy router, when some come before it."""
        first = self.first_noisy
        return None if first is None else self.analysis.clean_prefix(first)

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
        with self._in_use(), routing(self.patch, self._plan(member_BQ, position_BQ, bank, seed_BQ)):
            model_kwargs.setdefault("use_cache", True)
            return self.model(position_ids=position_BQ, output_router_logits=False, **model_kwargs)

    @property
    def fan_out(self) -> FanOut | None:
        """Where decode steps fan out (the analysis of this schedule's first noisy router), or None."""
        first = self.first_noisy
        return None if first is None else self.analysis.fan_out(first)

    @property
    def can_fan_out(self) -> bool:
        """True when decode steps can run the clean prefix layers once (see ``fan_out_forward``)."""
        return self.fan_out is not None

    @property
    def fan_out_point(self) -> str | None:
        """Where decode steps fan out: "block" (the first noisy MoE block), "layer", or None."""
        fan_out = self.fan_out
        return None if fan_out is None else fan_out.point

    def fan_out_forward(self, *, member_BK: torch.Tensor, position_B: torch.Tensor, input_ids_B: torch.Tensor,
                        masks_1, masks_K, cache: CleanCache, bank: NoiseBank | None = None,
                        seed_B: torch.Tensor | None = None):
        """A decode step that runs the clean prefix once per prompt, then the K members.

        The model sees one query row per prompt (``masks_1``). The clean prefix is every layer
        before the first one with a noisy router and, where the analysis found it equal, that
        layer's attention too: a pre-hook on its MoE block (else on the layer) repeats the
        hidden states and per-query inputs to the K member rows, and pre-hooks on the later
        layers do the same and swap in the K-row masks (roe/analysis.py ``FanOut``). The clean
        prefix is identical for all members, so the result equals ``forward`` on K rows while
        the prefix costs 1/K. ``cache`` is given as is (its ``storing`` says what the step
        keeps). ``seed_B``: one noise seed per prompt (default ``cfg.seed``).
        """
        fan_out = self.fan_out
        if fan_out is None:
            raise RuntimeError("fan-out is not available for this model")
        B, K = member_BK.shape
        seed_BK = None if seed_B is None else seed_B[:, None].expand(B, K)
        plan = self._plan(member_BK, position_B[:, None].expand(B, K), bank, seed_BK)
        with self._in_use(), routing(self.patch, plan):
            return fan_out.forward(self.model, members=K, input_ids_B=input_ids_B, position_B=position_B,
                                   masks_1=masks_1, masks_K=masks_K, cache=cache)

    def clean_forward(self, input_ids, mask_BS, cache: CleanCache):
        """The clean member on (left-padded) rows, storing every position in ``cache`` (the untouched
        model unless ``experts_per_token`` dials k: installed for the call like ``forward``)."""
        with self._in_use(), routing(self.patch, None):
            return self.model(input_ids=input_ids, attention_mask=mask_BS.long(),
                              position_ids=positions_from_mask(mask_BS), past_key_values=cache.storing(None),
                              use_cache=True, output_router_logits=False)

    @property
    def _head(self) -> PackedHead | None:
        """The packed LM head of decode steps (the model's, packed once); None for one member."""
        return self.analysis.head() if self.members > 1 else None

    @property
    def _small_m(self) -> SmallM | None:
        """The small-M kernel for the per-layer products of decode steps; None for one member."""
        return self.analysis.small_m() if self.members > 1 else None

    @contextmanager
    def decode_kernels(self) -> Iterator[None]:
        """Faster products for the K rows of a decode step (roe/kernels.py); none when K = 1.

        With one member the model runs untouched, so K = 1 reproduces it bit for bit. None when
        the roster's config says ``kernels=False``. Nor with autograd on: neither kernel has a
        backward, and on inputs that require grad the oneDNN head is far slower; the decoders'
        callers all run under no_grad.
        """
        if self.members == 1 or not self.cfg.kernels or torch.is_grad_enabled():
            yield
            return
        with ExitStack() as stack:
            for kernel in (self._head, self._small_m):
                if kernel is not None:
                    stack.enter_context(kernel.installed())
            yield
