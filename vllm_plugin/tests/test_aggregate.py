"""The logits a RoE step returns: each RoE request's row is roe's MeanProb over its members, others untouched.

Every test runs both forms of the members' mean (PyTorch's ``log_mean`` and the compiled kernel); the kernel is
also held to the PyTorch form on logits that reach its edges (vector tails, exponents below -87, denormal and
zero sums, -inf logits).
"""

from __future__ import annotations

import pytest
import torch
from roe_vllm import aggregation
from roe_vllm.members import Request, Step
from roe_vllm.model import aggregate
from roe_vllm.settings import Roster

from roe.aggregate import MeanProb


def step_of(members: dict[int, int]) -> Step:
    """A step whose requests sit at the given logits rows with the given K."""
    requests = [Request(index=i, row=i, position=5, roster=Roster(members=k, tau_L=(0.1,), seed=k % 2))
                for i, k in members.items()]
    return Step.build(6, requests, banks={})


def compiled_or_none(form: str):
    if form == "pytorch":
        return None
    compiled = aggregation.kernel()
    assert compiled is not None, "the member-mean kernel did not build (see stderr)"
    return compiled


@pytest.mark.parametrize("form", ["pytorch", "kernel"])
def test_each_request_gets_the_mean_of_its_members_probabilities(form):
    torch.manual_seed(0)
    step = step_of({0: 3, 2: 5, 3: 2, 5: 3})  # rows 1 and 4 are plain requests
    N, V = 6, 50
    logits_YV = torch.randn(N + step.num_members, V) * 3
    out_NV = aggregate(logits_YV, N, step, compiled_or_none(form))
    for i in (1, 4):
        assert torch.equal(out_NV[i], logits_YV[i])
    for r, request in enumerate(step.requests):
        member_rows = N + (step.request_M == r).nonzero().flatten()
        members_KV = torch.cat([logits_YV[request.index][None], logits_YV[member_rows]])
        assert members_KV.shape[0] == request.roster.members
        torch.testing.assert_close(out_NV[request.index], MeanProb.from_logits(members_KV, dim=0), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("form", ["pytorch", "kernel"])
def test_a_token_that_underflows_in_every_member_stays_finite(form):
    step = step_of({0: 2})
    logits_YV = torch.zeros(1 + 1, 4)
    logits_YV[:, 3] = -200.0  # exp(-200) underflows in fp32 in both members
    out = aggregate(logits_YV, 1, step, compiled_or_none(form))[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.log_softmax(logits_YV[0], -1))


@pytest.mark.parametrize("V", [8, 61, 8192])  # whole registers only, a scalar tail, the default model's vocab
def test_the_kernel_is_the_pytorch_mean(V):
    torch.manual_seed(V)
    step = step_of({0: 3, 2: 5, 3: 2, 5: 8})  # rows 1 and 4 are plain requests
    N = 6
    logits_YV = torch.randn(N + step.num_members, V) * 4
    logits_YV[-1, : V // 2] -= 95.0  # exponents below -87 in one member: denormal or zero probabilities
    logits_YV[0, 1] = float("-inf")  # a masked token in member 0 only
    r = next(r for r, request in enumerate(step.requests) if request.index == 2)
    member_rows = (N + (step.request_M == r).nonzero().flatten()).tolist()
    logits_YV[[2] + member_rows, 2] = -120.0  # exp underflows to 0 in every member of request 2
    want_RV, want_underflow_R = aggregation.log_mean(logits_YV, N, step)
    got_RV, got_underflow_R = compiled_or_none("kernel").log_mean(logits_YV, step.request_rows(), step.offsets()[0], N)
    assert torch.equal(got_underflow_R, want_underflow_R) and want_underflow_R.tolist() == [i == r for i in range(4)]
    assert torch.equal(torch.isinf(got_RV), torch.isinf(want_RV))
    finite = torch.isfinite(want_RV)
    torch.testing.assert_close(got_RV[finite], want_RV[finite], atol=2e-6, rtol=2e-6)
