"""Prefill + batched decode loop: ``Decoding`` (rows join and leave between steps) and ``generate``.

Shapes: B prompts, K members, P stored positions, R live rows of a step, V vocab.

1. Prefill: each prompt but its last token runs once, clean, at batch 1 (so a prompt's
   history never depends on its batch-mates), whenever it joins.
2. Decode: every step feeds each live prompt's current token to the K members. Attention-only
   models fold the members into the sequence axis and run ONE forward of B x K rows over one
   clean cache (``FoldedDecoder``, roe/cache.py); hybrid recurrent models copy the clean state
   to K rows and re-sync it to member 0 after the step (``ExpandedDecoder``). The K
   distributions are aggregated (roe/aggregate.py) and the next token is drawn from the
   aggregate: argmax by default, or temperature / top-p sampling with a keyed uniform
   (roe/routing.py), so sampling too is a pure function of (seed, position) and independent of
   the batch.
3. Scheduling: ``Decoding`` is the state over live rows. Prompts join between steps (prefilled,
   then merged into the running left-padded cache) and leave when they finish or are dropped,
   each with its own seed, sampling settings and stop conditions (roe/stopping.py: eos, stop
   strings, max_new_tokens, checked once per step on a bounded tail of the text); its
   ``steps()`` generator yields each step's tokens and log-probs. ``generate`` consumes it; so
   does the server's worker (roe/serve/worker.py), which admits requests into running batches.

This module knows nothing about routers: it drives the member forwards of roe/members.py, which
carry each row's noise to the routers. roe/roster.py builds on it, never the reverse. It runs
its own loop instead of ``model.generate`` (keep the grouped_mm experts path, one forward per
step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from roe.cache import CleanCache, first_member, member_masks
from roe.members import Members, check_inputs
from roe.routing import NoiseBank, sampling_uniform
from roe.stopping import StopConditions, StopState


class FoldedDecoder:
    """Attention-only models: one clean cache, the K members folded into the sequence axis.

    Prefill (``admit``): each prompt but its last token, clean, at batch 1; the histories are
    stacked right-aligned (left padding) after the running prompts', whose rows are re-padded when
    a newcomer's history is longer. Step: ONE forward of B x K rows; member 0's keys/values are
    committed. ``keep`` drops finished prompts between steps. Each prompt carries its own noise
    seed, so prompts of requests with different seeds share the forward.
    """

    def __init__(self, roster: Members, rows: Sequence[torch.Tensor] = (), fan_out: bool = True,
                 seeds: Sequence[int] | None = None) -> None:
        self.roster, self.fan_out = roster, fan_out
        self.bank = roster.noise_bank()
        self.cache = CleanCache()
        self.pos_BP = torch.zeros(0, 0, dtype=torch.long)
        self.valid_BP = torch.zeros(0, 0, dtype=torch.bool)
        self.seed_B = torch.zeros(0, dtype=torch.long)
        self.admit(rows, seeds)

    def admit(self, rows: Sequence[torch.Tensor], seeds: Sequence[int] | None = None) -> None:
        """Add prompts (1-D token ids, last token not yet fed) after the running ones."""
        if not len(rows):
            return
        seeds = list(seeds) if seeds is not None else [self.roster.cfg.seed] * len(rows)
        running_B, running_P = self.pos_BP.shape
        lengths = [len(row) - 1 for row in rows]
        width = max([running_P, *lengths])
        self.cache = CleanCache.left_padded([self.cache, *self._prefill(rows)], [running_P, *lengths],
                                            [running_B] + [1] * len(rows))
        slot_P = torch.arange(width)
        start_N = width - torch.tensor(lengths)
        pad_BP = torch.zeros(running_B, width - running_P, dtype=torch.long)
        self.valid_BP = torch.cat([torch.cat([pad_BP.bool(), self.valid_BP], dim=1),
                                   slot_P[None, :] >= start_N[:, None]])
        self.pos_BP = torch.cat([torch.cat([pad_BP, self.pos_BP], dim=1),
                                 (slot_P[None, :] - start_N[:, None]).clamp(min=0)])
        self.seed_B = torch.cat([self.seed_B, torch.tensor(seeds, dtype=torch.long)])

    def _prefill(self, rows: Sequence[torch.Tensor]) -> list[CleanCache]:
        """The clean history of each prompt but its last token, at batch 1.

        NOTE: identical prompts (the n choices of one request) are prefilled once: the batch-1
        forward of the same tokens is the same computation, so sharing it changes nothing.
        """
        done: dict[tuple, CleanCache] = {}
        for row in rows:
            key = tuple(row[:-1].tolist())
            if key not in done:
                done[key] = CleanCache()
                if key:
                    prefix = row[:-1][None]
                    self.roster.clean_forward(prefix, torch.ones_like(prefix, dtype=torch.bool), done[key])
        return [done[tuple(row[:-1].tolist())] for row in rows]

    def keep(self, rows_B: torch.Tensor) -> None:
        """Keep only the given prompts (indices into the batch), and drop the padding no kept prompt needs."""
        valid_BP = self.valid_BP[rows_B]
        used_P = valid_BP.any(dim=0)
        start = int(used_P.long().argmax()) if bool(used_P.any()) else used_P.shape[0]
        self.cache.select(rows_B, start)
        self.valid_BP, self.pos_BP = valid_BP[:, start:], self.pos_BP[rows_B, start:]
        self.seed_B = self.seed_B[rows_B]

    def step(self, tokens_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        """Aggregated log-probs [B, V] after feeding each prompt's token at its position."""
        roster, K, B = self.roster, self.roster.members, tokens_B.shape[0]
        pos_BK = pos_B[:, None].expand(B, K)
        masks = member_masks(roster.windows, self.pos_BP, self.valid_BP, pos_BK, roster.mask_dtype)
        cache = self.cache.storing(1)  # the clean member's keys/values; the other members' are scratch
        with roster.decode_kernels():
            if K > 1 and self.fan_out and roster.can_fan_out:
                masks_1 = first_member(masks, self.pos_BP.shape[1])
                logits_BKV = roster.fan_out_forward(
                    member_BK=torch.arange(K).expand(B, K), position_B=pos_B, input_ids_B=tokens_B,
                    masks_1=masks_1, masks_K=masks, cache=cache, bank=self.bank, seed_B=self.seed_B,
                ).logits
            else:
                logits_BKV = roster.forward(
                    member_BQ=torch.arange(K).expand(B, K), position_BQ=pos_BK,
                    input_ids=tokens_B[:, None].expand(B, K), attention_mask=masks, past_key_values=cache,
                    bank=self.bank, seed_BQ=self.seed_B[:, None],
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
    forward per prompt. Prompts join (``admit``) and leave (``keep``) between steps.
    """

    def __init__(self, roster: Members, rows: Sequence[torch.Tensor] = (), seeds: Sequence[int] | None = None) -> None:
        self.roster, self.caches, self.banks, self.seeds = roster, [], [], []
        self.admit(rows, seeds)

    def admit(self, rows: Sequence[torch.Tensor], seeds: Sequence[int] | None = None) -> None:
        """Add prompts (1-D token ids, last token not yet fed): each prefilled clean at batch 1."""
        seeds = list(seeds) if seeds is not None else [self.roster.cfg.seed] * len(rows)
        for row, seed in zip(rows, seeds, strict=True):
            cache = None  # the model creates its own cache class (MiniMax refuses a DynamicCache)
            if len(row) > 1:  # the clean member through the roster: an experts_per_token dial applies
                prefix_S = row[:-1]
                cache = self.roster.forward(member_BQ=torch.zeros_like(prefix_S)[None],
                                            position_BQ=torch.arange(len(prefix_S))[None],
                                            input_ids=prefix_S[None]).past_key_values
            self.caches.append(cache)
            self.banks.append(NoiseBank(seed, self.roster.members))  # one per prompt: each runs its own forward
            self.seeds.append(seed)

    def keep(self, rows_B: torch.Tensor) -> None:
        """Keep only the given prompts (indices into the batch)."""
        kept = rows_B.tolist()
        self.caches = [self.caches[b] for b in kept]
        self.banks, self.seeds = [self.banks[b] for b in kept], [self.seeds[b] for b in kept]

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
                    seed_BQ=torch.full((K, 1), self.seeds[b]),
                )
                self.caches[b] = outputs.past_key_values
                keep_rows(self.caches[b], torch.zeros(1, dtype=torch.long))
                out.append(self.roster.combine(outputs.logits[:, -1], dim=0))
        return torch.stack(out)


DECODERS = {"fold": FoldedDecoder, "expand": ExpandedDecoder}


@torch.no_grad()
def score_stepwise(roster: Members, input_ids: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
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


def choose_next(logprobs_BV, *, do_sample, temperature, top_p, uniform_B) -> torch.Tensor:
    """Greedy argmax, or inverse-CDF sampling from the tempered, nucleus-truncated aggregate.

    ``do_sample``, ``temperature`` and ``top_p`` are one value for every prompt or a tensor [B]
    of one per prompt (prompts of different requests share a step); a prompt's token is the
    same either way.
    """
    greedy_B = logprobs_BV.argmax(dim=-1)
    if not isinstance(do_sample, torch.Tensor) and not do_sample:
        return greedy_B
    temperature = temperature[:, None] if isinstance(temperature, torch.Tensor) else temperature
    top_p = top_p[:, None] if isinstance(top_p, torch.Tensor) else top_p
    probs_BV = torch.softmax(logprobs_BV / temperature, dim=-1)
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    cum_BV = sorted_BV.cumsum(dim=-1)
    sorted_BV = sorted_BV.masked_fill(cum_BV - sorted_BV >= top_p, 0.0)
    cdf_BV = sorted_BV.cumsum(dim=-1)
    pick_B = torch.searchsorted(cdf_BV, (uniform_B * cdf_BV[:, -1])[:, None]).clamp(max=cdf_BV.shape[-1] - 1)
    sampled_B = order_BV.gather(-1, pick_B)[:, 0]
    return torch.where(do_sample, sampled_B, greedy_B) if isinstance(do_sample, torch.Tensor) else sampled_B


def _check_options(max_new_tokens, do_sample, temperature, top_p, stop_strings, tokenizer) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    _check_sampling(do_sample, temperature, top_p)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs tokenizer= to decode the generated text")


def _check_sampling(do_sample, temperature, top_p) -> None:
    if do_sample and not (temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _as_set(token_ids) -> set[int]:
    if token_ids is None:
        return set()
    return {int(token_ids)} if isinstance(token_ids, int) else {int(t) for t in token_ids}


def model_eos(model) -> frozenset[int]:
    """The end-of-sequence ids of the model's generation config (none if it has none)."""
    return frozenset(_as_set(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))


@dataclass(eq=False)
class Row:
    """One prompt of a ``Decoding``: its settings, and its progress once admitted.

    ``prompt`` holds 1-D token ids; ``stop`` says when the row ends (an eos token, which it
    emits; a stop string; ``max_new_tokens``). ``finish`` is None while the row is live, then
    "eos", "stop" (a stop string), "length", or "dropped" (removed by the caller: a cancelled request).
    """

    prompt: torch.Tensor
    seed: int
    stop: StopConditions
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    token: int = field(init=False)  # the token the next step feeds, at ``position``
    position: int = field(init=False)
    progress: StopState = field(init=False, repr=False)
    finish: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, torch.Tensor) or self.prompt.dim() != 1 or len(self.prompt) == 0:
            raise ValueError("a row's prompt must be a non-empty 1-D tensor of token ids")
        if not isinstance(self.stop, StopConditions):
            raise TypeError(f"a row's stop must be StopConditions, got {type(self.stop).__name__}")
        _check_sampling(self.do_sample, self.temperature, self.top_p)
        self.token, self.position = int(self.prompt[-1]), len(self.prompt) - 1
        self.progress = self.stop.start()

    @property
    def generated(self) -> int:
        """Tokens generated so far."""
        return self.progress.generated


@dataclass(frozen=True)
class Step:
    """One decode step of a ``Decoding``: its live rows, the token each got [R], and the
    aggregated RoE log-probs [R, V] it was chosen from (before temperature and top-p). Rows
    that finished at this step have ``finish`` set and are no longer live."""

    rows: list[Row]
    tokens_R: torch.Tensor
    logprobs_RV: torch.Tensor


class Decoding:
    """The live rows of one roster, decoded one step at a time; rows join and leave between steps.

    This is iteration-level batching: ``admit`` prefills newcomers (clean, at batch 1) and merges
    them into the running batch, ``step`` runs ONE forward over every live row and draws each
    row's next token, and rows that finish (their ``stop`` conditions) or that the caller
    ``drop``s leave before the next step. A row's tokens do not depend on which rows share its
    steps: its history is prefilled alone, its noise and its sampling uniform are keyed by (its
    seed, member, position), and padding is masked out. ``generate`` and the server consume it.
    """

    def __init__(self, roster: Members, *, fan_out: bool = True) -> None:
        self.roster = roster
        self.decoder = FoldedDecoder(roster, fan_out=fan_out) if roster.strategy == "fold" else ExpandedDecoder(roster)
        self.rows: list[Row] = []

    def admit(self, rows: list[Row]) -> list[Row]:
        """Prefill ``rows`` and add them to the batch; they take part from the next step on."""
        if any(row in self.rows or row.finish for row in rows):
            raise ValueError("a row can be admitted once")
        self.decoder.admit([row.prompt for row in rows], [row.seed for row in rows])
        self.rows.extend(rows)
        return rows

    def drop(self, rows: list[Row]) -> None:
        """Remove live rows before the next step (their ``finish`` becomes "dropped" if unset)."""
        gone = {id(row) for row in rows}
        kept = [b for b, row in enumerate(self.rows) if id(row) not in gone]
        if len(kept) == len(self.rows):
            return
        for row in rows:
            row.finish = row.finish or "dropped"
        self.decoder.keep(torch.tensor(kept, dtype=torch.long))
        self.rows = [self.rows[b] for b in kept]

    def step(self) -> Step:
        """Feed every live row its token, choose its next one, and retire the rows that finished."""
        rows = list(self.rows)
        if not rows:
            raise RuntimeError("no live rows to decode")
        pos_R = torch.tensor([row.position for row in rows])
        logprobs_RV = self.decoder.step(torch.tensor([row.token for row in rows]), pos_R)
        sampling = any(row.do_sample for row in rows)
        chosen_R = choose_next(
            logprobs_RV, do_sample=torch.tensor([row.do_sample for row in rows]) if sampling else False,
            temperature=torch.tensor([row.temperature for row in rows], dtype=logprobs_RV.dtype),
            top_p=torch.tensor([row.top_p for row in rows], dtype=logprobs_RV.dtype),
            uniform_B=sampling_uniform(torch.tensor([row.seed for row in rows]), pos_R) if sampling else None,
        )
        for row, token in zip(rows, chosen_R.tolist(), strict=True):
            row.token, row.position = token, row.position + 1
            row.finish = row.progress.update(token)
        self.drop([row for row in rows if row.finish])
        return Step(rows, chosen_R, logprobs_RV)

    def steps(self) -> Iterator[Step]:
        """Steps until no row is live; rows may be admitted or dropped between them."""
        while self.rows:
            yield self.step()


@torch.no_grad()
def generate(
    roster: Members,
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
    ``pad_token_id`` and no longer computed. ``streamer`` is a transformers streamer
    (``put``/``end``); ``callback`` receives each step's tokens [B]; ``on_step`` receives the
    tokens and the aggregated RoE log-probs [B, V] they were chosen from (before temperature and
    top-p; NaN on the rows of prompts already finished). A consumer of ``Decoding``.
    """
    mask_BS = check_inputs(input_ids, attention_mask)
    _check_options(max_new_tokens, do_sample, temperature, top_p, stop_strings, tokenizer)
    eos = _as_set(eos_token_id) if eos_token_id is not None else set(model_eos(roster.model))
    pad = pad_token_id if pad_token_id is not None else getattr(getattr(roster.model, "generation_config", None),
                                                                "pad_token_id", None)
    pad = pad if pad is not None else (min(eos) if eos else 0)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if max_new_tokens == 0:
        return input_ids.clone()
    decoding = Decoding(roster)
    stop = StopConditions(max_new_tokens=max_new_tokens, eos=frozenset(eos), strings=tuple(stop_strings or ()),
                          tokenizer=tokenizer)
    rows = decoding.admit([Row(ids[m], seed=roster.cfg.seed, stop=stop, do_sample=do_sample, temperature=temperature,
                               top_p=top_p) for ids, m in zip(input_ids, mask_BS, strict=True)])
    index = {id(row): b for b, row in enumerate(rows)}
    new_tokens = []
    for step in decoding.steps():
        at_R = torch.tensor([index[id(row)] for row in step.rows])
        chosen_B = torch.full((len(rows),), pad, dtype=torch.long).index_copy_(0, at_R, step.tokens_R)
        new_tokens.append(chosen_B)
        if streamer is not None:
            streamer.put(chosen_B.cpu())
        if callback is not None:
            callback(chosen_B)
        if on_step is not None:
            logprobs_BV = step.logprobs_RV.new_full((len(rows), step.logprobs_RV.shape[1]), math.nan)
            on_step(chosen_B, logprobs_BV.index_copy_(0, at_R, step.logprobs_RV))
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)

