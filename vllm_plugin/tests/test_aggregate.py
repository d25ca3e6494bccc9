"""The logits a RoE step returns: each RoE request's row is roe's MeanProb over its members, others untouched."""

from __future__ import annotations

import torch
from roe_vllm.members import Request, Step
from roe_vllm.model import aggregate
from roe_vllm.settings import Roster

from roe.aggregate import MeanProb


def step_of(members: dict[int, int]) -> Step:
    """A step whose requests sit at the given logits rows with the given K."""
    requests = [Request(index=i, row=i, position=5, roster=Roster(members=k, tau_L=(0.1,), seed=k % 2))
                for i, k in members.items()]
    return Step.build(6, requests, banks={})


def test_each_request_gets_the_mean_of_its_members_probabilities():
    torch.manual_seed(0)
    step = step_of({0: 3, 2: 5, 3: 2, 5: 3})  # rows 1 and 4 are plain requests
    N, V = 6, 50
    logits_YV = torch.randn(N + step.num_members, V) * 3
    out_NV = aggregate(logits_YV, N, step)
    for i in (1, 4):
        assert torch.equal(out_NV[i], logits_YV[i])
    for r, request in enumerate(step.requests):
        member_rows = N + (step.request_M == r).nonzero().flatten()
        members_KV = torch.cat([logits_YV[request.index][None], logits_YV[member_rows]])
        assert members_KV.shape[0] == request.roster.members
        torch.testing.assert_close(out_NV[request.index], MeanProb.from_logits(members_KV, dim=0), atol=1e-6, rtol=1e-6)


def test_a_token_that_underflows_in_every_member_stays_finite():
    step = step_of({0: 2})
    logits_YV = torch.zeros(1 + 1, 4)
    logits_YV[:, 3] = -200.0  # exp(-200) underflows in fp32 in both members
    out = aggregate(logits_YV, 1, step)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.log_softmax(logits_YV[0], -1))
