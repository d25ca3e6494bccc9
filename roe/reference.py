"""The slow, obviously correct RoE: ground truth for the fast paths' tests.

For the step that feeds token t of a single prompt:

    history = the untouched model run on tokens[:t]           (a fresh cache of the model's own class)
    for k in 0..K-1:  logits_k = model(tokens[t], past = copy(history), member k's noise at t)
    logprobs_t = aggregate(log_softmax(logits_k) for all k)

K separate forwards per position, each with its own deep copy of the clean history, the
model's own cache classes and masks (sliding windows included), no folding, no custom masks
and no member skipping. It shares only the router adapters and the keyed noise with the fast
path, so the two must agree draw for draw.
"""

from __future__ import annotations

import copy

import torch

from roe.aggregate import aggregate
from roe.members import Members


@torch.no_grad()
def step_logprobs(roster: Members, tokens: torch.Tensor) -> torch.Tensor:
    """Aggregated log-probs [V] of the token after ``tokens`` (1-D, no padding)."""
    model = roster.model
    t = len(tokens) - 1
    history = model(input_ids=tokens[None, :t], use_cache=True).past_key_values if t > 0 else None
    members = []
    for k in range(roster.cfg.roster_size):
        past = copy.deepcopy(history)
        logits = roster.forward(
            member_BQ=torch.tensor([[k]]), position_BQ=torch.tensor([[t]]),
            input_ids=tokens[None, t:], past_key_values=past,
        ).logits[0, -1]
        members.append(torch.log_softmax(logits.float(), dim=-1))
    return aggregate(torch.stack(members), roster.cfg.aggregator, dim=0)


@torch.no_grad()
def score(roster: Members, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs [S, V] at every position of one unpadded sequence."""
    return torch.stack([step_logprobs(roster, tokens[: t + 1]) for t in range(len(tokens))])


@torch.no_grad()
def generate_greedy(roster: Members, tokens: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy RoE continuation of one unpadded prompt; returns prompt + new tokens."""
    for _ in range(max_new_tokens):
        tokens = torch.cat([tokens, step_logprobs(roster, tokens).argmax()[None]])
    return tokens
