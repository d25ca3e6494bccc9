"""roster(): RoE on a model inside a ``with`` block, generation and teacher-forced scoring.

Shapes: B prompts, K members, S positions, Q query rows of one forward, V vocab, L MoE layers.

``roster(model, cfg)`` validates everything before any compute. The model's routers, their
rules (found and self-tested), its attention windows, fan-out point and decode kernels are its
analysis (roe/analysis.py), done once per model, so a roster is cheap to build: its member
forwards (roe/members.py) are that analysis plus the request's settings. Entering its ``with``
block installs the router wrappers (roe/patch.py); leaving it (also through an exception)
deletes them: the model's modules, parameters and buffers are exactly as before, and the
roster is closed (using it raises). A roster used without a ``with`` block installs its
wrappers for each call and removes them after it.

``generate`` is the decode loop of roe/engine.py. ``score`` is generation's semantics at every
position at once: a clean forward stores the clean history and gives member 0; the noisy
members of all positions then run in a few folded forwards, each query row seeing the clean
history before its position plus itself (roe/cache.py). Models that cannot fold score step by
step (``roe.engine.score_stepwise``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from roe.analysis import positions_from_mask
from roe.cache import CleanCache, member_masks
from roe.config import RoEConfig
from roe.engine import generate as generate_rows
from roe.engine import score_stepwise
from roe.members import CLOSED, Members, check_inputs, check_model, schedule_for

__all__ = ["CLOSED", "Roster", "check_inputs", "check_model", "positions_from_mask", "roster", "schedule_for",
           "target_logprob"]

SCORE_ROWS = 4096  # query rows per folded scoring forward (bounds the mask and logits memory)
FOLD_KEYS = 512  # folding M members makes each query attend over S * (1 + M) keys: keep that small


class Roster(Members):
    """RoE on a model: ``with roe.roster(model, cfg) as r:`` (see the module docstring)."""

    def __enter__(self) -> Roster:
        if self.closed or self.installed:
            raise RuntimeError("a roster opens once; " + CLOSED.split("; ", 1)[1])
        self.patch.install()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 64, **kwargs) -> torch.Tensor:
        """RoE generation; see ``roe.engine.generate`` for the options."""
        with self._in_use():
            return generate_rows(self, input_ids, attention_mask, max_new_tokens, **kwargs)

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
                              attention_mask=masks, past_key_values=cache.storing(0)).logits
        return logits.view(B, M, S, -1)


def roster(model, cfg: RoEConfig | None = None) -> Roster:
    """RoE on ``model``: ``with roe.roster(model, cfg) as r: r.generate(...)``.

    Everything is validated here, before any compute. Inside the ``with`` block RoE is installed;
    on exit the model is exactly as before and the roster is closed (using it raises). Used
    without a ``with`` block, each call installs RoE for its duration. ``RoEConfig(kernels=False)``
    keeps the model's own products in decode steps (no packed head, no compiled small-M kernel).
    """
    return Roster(model, cfg if cfg is not None else RoEConfig())


def target_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for every position, without the full log-softmax: [...]."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
