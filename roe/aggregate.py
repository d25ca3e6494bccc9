"""Aggregators: how the K members' next-token distributions become one.

Each aggregator is a streaming reduction over members, so ``score()`` can fold members in
chunk by chunk without holding K x S x V log-probs: ``partial`` reduces a block of members
along ``dim``, ``merge`` combines two partial states, ``finish`` turns the state of ``count``
members into log-probabilities over V.

- ``mean-prob`` (the paper, DESIGN §1): p = mean_k softmax(logits_k); returns log p.
- ``mean-logprob``: the normalised geometric mean, softmax(mean_k log p_k).
- ``vote``: each member votes for its argmax; returns the log of the vote shares.
"""

from __future__ import annotations

import math

import torch


class MeanProb:
    """log mean_k p_k, computed stably as logsumexp_k(log p_k) - log K."""

    @staticmethod
    def partial(logprobs: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.logsumexp(logprobs, dim=dim)

    @staticmethod
    def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(a, b)

    @staticmethod
    def finish(state: torch.Tensor, count: int) -> torch.Tensor:
        return state - math.log(count)


class MeanLogProb:
    """softmax of the mean member log-probability (a product of experts)."""

    @staticmethod
    def partial(logprobs: torch.Tensor, dim: int) -> torch.Tensor:
        return logprobs.sum(dim=dim)

    @staticmethod
    def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    @staticmethod
    def finish(state: torch.Tensor, count: int) -> torch.Tensor:
        return torch.log_softmax(state / count, dim=-1)


class Vote:
    """Majority vote over the members' argmax tokens, as log vote shares."""

    @staticmethod
    def partial(logprobs: torch.Tensor, dim: int) -> torch.Tensor:
        winners = logprobs.argmax(dim=-1, keepdim=True)
        votes = torch.zeros_like(logprobs).scatter_(-1, winners, 1.0)
        return votes.sum(dim=dim)

    @staticmethod
    def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    @staticmethod
    def finish(state: torch.Tensor, count: int) -> torch.Tensor:
        return torch.log(state / count)


AGGREGATORS = {"mean-prob": MeanProb, "mean-logprob": MeanLogProb, "vote": Vote}


def aggregate(logprobs: torch.Tensor, name: str = "mean-prob", dim: int = -2) -> torch.Tensor:
    """Aggregate member log-probs held along ``dim`` (default [..., K, V] -> [..., V])."""
    agg = AGGREGATORS[name]
    return agg.finish(agg.partial(logprobs, dim), logprobs.shape[dim])
