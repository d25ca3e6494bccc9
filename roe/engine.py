"""Prefill + batched decode loop: the roster's ``generate``.

Shapes: B prompts, K members, P stored positions, V vocab.

1. Prefill: each prompt but its last token runs once, clean, at batch 1 (so a prompt's
   history never depends on its batch-mates).
2. Decode: every step feeds each prompt's current token to the K members. Attention-only
   models fold the members into the sequence axis and run ONE forward of B x K rows over one
   clean cache (``FoldedDecoder``, roe/cache.py); hybrid recurrent models copy the clean state
   to K rows and re-sync it to member 0 after the step (``ExpandedDecoder``). The K
   distributions are aggregated (roe/aggregate.py) and the next token is drawn from the
   aggregate: argmax by default, or
   temperature / top-p sampling with a keyed uniform (roe/routing.py), so sampling too is a pure
   function of (seed, position) and independent of the batch.

This module knows nothing about routers; the roster's ``forward`` carries the noise plan.
It runs its own loop instead of ``model.generate`` (DESIGN §5: keep the grouped_mm experts
path, one forward per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from roe.cache import CleanCache, first_member, member_masks
from roe.roster import Roster, check_inputs
from roe.routing import sampling_uniform


class FoldedDecoder:
    """Attention-only models: one clean cache, the K members folded into the sequence axis.

    Prefill: each prompt but its last token, clean, at batch 1; the histories are stacked
    left-padded. Step: ONE forward of B x K rows; member 0's keys/values are committed.
    """

    def __init__(self, roster: Roster, rows: list[torch.Tensor], fan_out: bool = True) -> None:
        self.roster, self.fan_out = roster, fan_out
        self.bank = roster.noise_bank()
        caches, lengths = [], []
        for row in rows:
            cache = CleanCache()
            if len(row) > 1:
                prefix = row[:-1][None]
                roster.clean_forward(prefix, torch.ones_like(prefix, dtype=torch.bool), cache)
            caches.append(cache)
            lengths.append(len(row) - 1)
        slot_P = torch.arange(max(lengths))
        start_B = max(lengths) - torch.tensor(lengths)
        self.valid_BP = slot_P[None, :] >= start_B[:, None]
        self.pos_BP = (slot_P[None, :] - start_B[:, None]).clamp(min=0)
        self.cache = CleanCache.left_padded(caches, lengths)

    def step(self, tokens_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        """Aggregated log-probs [B, V] after feeding each prompt's token at its position."""
        roster, K, B = self.roster, self.roster.members, tokens_B.shape[0]
        pos_BK = pos_B[:, None].expand(B, K)
        masks = member_masks(roster.windows, self.pos_BP, self.valid_BP, pos_BK, roster.mask_dtype)
        self.cache.commit = 1
        with roster.decode_kernels():
            if K > 1 and self.fan_out and roster.can_fan_out:
                masks_1 = first_member(masks, self.pos_BP.shape[1])
                logits_BKV = roster.fan_out_forward(
                    member_BK=torch.arange(K).expand(B, K), position_B=pos_B, input_ids_B=tokens_B,
                    masks_1=masks_1, masks_K=masks, cache=self.cache, bank=self.bank,
                ).logits
            else:
                logits_BKV = roster.forward(
                    member_BQ=torch.arange(K).expand(B, K), position_BQ=pos_BK,
                    input_ids=tokens_B[:, None].expand(B, K), attention_mask=masks, past_key_values=self.cache,
                    bank=self.bank,
                ).logits
        self.pos_BP = torch.cat([self.pos_BP, pos_B[:, None]], dim=1)
        self.valid_BP = torch.cat([self.valid_BP, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        return roster.combine(logits_BKV, dim=1)


def keep_rows(cache, rows: torch.Tensor) -> None:
    """Keep (or repeat) the given batch rows of a model's own cache, in place.

    NOTE: ``reorder_cache`` reaches every state held in ``cache.layers`` (keys/values, conv and
    recurrent states). MiniMaxCache keeps its linear-attention states outside ``layers``, which its
    ``reorder_cache`` misses (transformers 5.23); a cache class that overrides
    ``batch_select_indices`` knows its own layout, so that is used instead.
    """
    from transformers.cache_utils import Cache

    if type(cache).batch_select_indices is not Cache.batch_select_indices:
        cache.batch_select_indices(rows)
    else:
        cache.reorder_cache(rows)


class ExpandedDecoder:
    """Hybrid models with recurrent / linear-attention state, which cannot fold members.

    Per prompt, the model's own cache holds the clean state at batch 1. A step copies it to K
    batch rows, runs the K members, and keeps row 0 (the clean member): the state is re-synced
    to the clean member every step. Costs K x the state memory during the step and one
    forward per prompt.
    """

    def __init__(self, roster: Roster, rows: list[torch.Tensor]) -> None:
        self.roster, self.caches = roster, []
        self.banks = [roster.noise_bank() for _ in rows]  # one per prompt: each runs its own forward
        for row in rows:
            cache = None  # the model creates its own cache class (MiniMax refuses a DynamicCache)
            if len(row) > 1:
                cache = roster.model(input_ids=row[None, :-1], use_cache=True).past_key_values
            self.caches.append(cache)

    def step(self, tokens_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        K = self.roster.members
        out = []
        with self.roster.decode_kernels():
            for b, (token, pos) in enumerate(zip(tokens_B, pos_B, strict=True)):
                if self.caches[b] is not None:
                    keep_rows(self.caches[b], torch.zeros(K, dtype=torch.long))
                outputs = self.roster.forward(
                    member_BQ=torch.arange(K)[:, None], position_BQ=pos.expand(K, 1),
                    input_ids=token.expand(K, 1), past_key_values=self.caches[b], bank=self.banks[b],
                )
                self.caches[b] = outputs.past_key_values
                keep_rows(self.caches[b], torch.zeros(1, dtype=torch.long))
                out.append(self.roster.combine(outputs.logits[:, -1], dim=0))
        return torch.stack(out)


DECODERS = {"fold": FoldedDecoder, "expand": ExpandedDecoder}


@torch.no_grad()
def score_stepwise(roster: Roster, input_ids: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-probs [B, S, V] one position at a time (models that cannot fold).

    Positions under padding hold the uniform distribution.
    """
    B, S = input_ids.shape
    vocab = roster.model.get_output_embeddings().weight.shape[0]
    out = torch.full((B, S, vocab), -math.log(vocab))
    for b in range(B):
        row = input_ids[b][mask_BS[b]]
        decoder = ExpandedDecoder(roster, [row[:1]])
        for t in range(len(row)):
            out[b, S - len(row) + t] = decoder.step(row[t : t + 1], torch.tensor([t]))[0]
    return out


def choose_next(logprobs_BV, *, do_sample: bool, temperature: float, top_p: float, uniform_B) -> torch.Tensor:
    """Greedy argmax, or inverse-CDF sampling from the tempered, nucleus-truncated aggregate."""
    if not do_sample:
        return logprobs_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logprobs_BV / temperature, dim=-1)
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    cum_BV = sorted_BV.cumsum(dim=-1)
    sorted_BV = sorted_BV.masked_fill(cum_BV - sorted_BV >= top_p, 0.0)
    cdf_BV = sorted_BV.cumsum(dim=-1)
    pick_B = torch.searchsorted(cdf_BV, (uniform_B * cdf_BV[:, -1])[:, None]).clamp(max=cdf_BV.shape[-1] - 1)
    return order_BV.gather(-1, pick_B)[:, 0]


def _check_options(max_new_tokens, do_sample, temperature, top_p, stop_strings, tokenizer) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not (temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs tokenizer= to decode the generated text")


def _as_set(token_ids) -> set[int]:
    if token_ids is None:
        return set()
    return {int(token_ids)} if isinstance(token_ids, int) else {int(t) for t in token_ids}


@torch.no_grad()
def generate(
    roster: Roster,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    streamer=None,
    callback: Callable[[torch.Tensor], None] | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` per prompt with the roster; returns [B, S + new].

    Prompts are left-padded rows of ``input_ids`` with ``attention_mask``. Stops per prompt at
    ``eos_token_id`` (default: the model's generation config) or when the decoded continuation
    contains one of ``stop_strings`` (needs ``tokenizer``); finished prompts are padded with
    ``pad_token_id``. ``streamer`` is a transformers streamer (``put``/``end``); ``callback``
    receives each step's tokens [B]; ``on_step`` receives the tokens and the aggregated RoE
    log-probs [B, V] they were chosen from (before temperature and top-p).
    """
    mask_BS = check_inputs(input_ids, attention_mask)
    _check_options(max_new_tokens, do_sample, temperature, top_p, stop_strings, tokenizer)
    gen_config = getattr(roster.model, "generation_config", None)
    eos = _as_set(eos_token_id if eos_token_id is not None else getattr(gen_config, "eos_token_id", None))
    pad = pad_token_id if pad_token_id is not None else getattr(gen_config, "pad_token_id", None)
    pad = pad if pad is not None else (min(eos) if eos else 0)
    rows = [ids[m] for ids, m in zip(input_ids, mask_BS, strict=True)]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if max_new_tokens == 0:
        return input_ids.clone()
    decoder = DECODERS[roster.strategy](roster, rows)
    tokens_B = torch.stack([row[-1] for row in rows])
    pos_B = torch.tensor([len(row) - 1 for row in rows])
    done_B = torch.zeros(len(rows), dtype=torch.bool)
    eos_V = torch.tensor(sorted(eos), dtype=torch.long)
    new_tokens = []
    for _ in range(max_new_tokens):
        logprobs_BV = decoder.step(tokens_B, pos_B)
        uniform_B = sampling_uniform(roster.cfg.seed, pos_B) if do_sample else None
        chosen_B = choose_next(logprobs_BV, do_sample=do_sample, temperature=temperature, top_p=top_p,
                               uniform_B=uniform_B)
        chosen_B = torch.where(done_B, torch.full_like(chosen_B, pad), chosen_B)
        new_tokens.append(chosen_B)
        tokens_B, pos_B = chosen_B, pos_B + 1
        if streamer is not None:
            streamer.put(chosen_B.cpu())
        if callback is not None:
            callback(chosen_B)
        if on_step is not None:
            on_step(chosen_B, logprobs_BV)
        done_B |= torch.isin(chosen_B, eos_V)
        if stop_strings:
            done_B |= _hit_stop(tokenizer, torch.stack(new_tokens, dim=1), stop_strings)
        if done_B.all():
            break
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def _hit_stop(tokenizer, new_BN: torch.Tensor, stop_strings: Sequence[str]) -> torch.Tensor:
    texts = tokenizer.batch_decode(new_BN, skip_special_tokens=True)
    return torch.tensor([any(s in text for s in stop_strings) for text in texts])
