"""The logits rows a RoE step returns: each RoE request's row replaced by log mean_k softmax over its K members.

Shapes: N logits rows (one per request of the batch), M member rows, Y = N + M, R RoE requests, V vocab.

    out[index_r] = log( (1 / K_r) * sum_k softmax(logits_k) )      k over the request's clean row and its members

The sum is what costs (Y softmaxes of V): ``log_mean`` in PyTorch (the reference: a softmax of the
RoE rows, ``index_add_`` of the members into their request's row, a division and a log), or a
compiled kernel (``aggregation.cpp``, built once per environment like the member-attention kernel)
that exponentiates each row once into a scratch row, adds it to its request's sum and takes the log
of the mean in place, with no [M, V] probability tensor. A token whose probability underflows in every member
sums to 0 and would get -inf: those requests take roe's stable ``MeanProb.from_logits`` instead, as in roe.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from roe.aggregate import MeanProb
from roe.kernels import Kernel
from roe_vllm.members import Step

KERNEL = Kernel("roe_vllm_aggregation", Path(__file__).with_name("aggregation.cpp"), ("log_mean",),
                "RoE's member-mean kernel", "PyTorch softmax and index_add_",
                headers=(Path(__file__).with_name("avx2_exp.h"),))

@functools.cache
def kernel():
    """The compiled member mean of this environment (built on first use, with a line on stderr), or None."""
    return KERNEL.load_or_build()


def log_mean(logits_YV: torch.Tensor, rows: int, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """log mean_k softmax(logits_k) [R, V] over each RoE request's clean row and member rows, in fp32, and which
    requests [R] have a token whose probability is 0 in every member (the reference of the kernel's ``log_mean``)."""
    sum_RV = torch.softmax(logits_YV[step.request_rows()].float(), dim=-1)
    sum_RV.index_add_(0, step.request_M, torch.softmax(logits_YV[rows:].float(), dim=-1))
    members_R = torch.tensor([float(r.roster.members) for r in step.requests])
    mean_RV = sum_RV.div_(members_R[:, None]).log_()
    return mean_RV, torch.isinf(mean_RV).any(dim=-1)


def aggregate(logits_YV: torch.Tensor, rows: int, step: Step, compiled=None) -> torch.Tensor:
    """The ``rows`` clean logits rows, each RoE request's replaced by log mean_k softmax over its K members.

    ``logits_YV``: the clean rows, then the member rows in the step's order (member 0 of a request is
    its clean row). ``compiled``: the kernel module (None, or logits off the CPU: PyTorch's ``log_mean``).
    """
    N = rows
    out_NV = logits_YV[:N].clone()
    index_R = step.request_rows()
    if compiled is None or logits_YV.device.type != "cpu":
        mean_RV, underflow_R = log_mean(logits_YV, N, step)
    else:
        mean_RV, underflow_R = compiled.log_mean(logits_YV.float().contiguous(), index_R, step.offsets()[0], N)
    out_NV[index_R] = mean_RV.to(out_NV.dtype)
    for r in underflow_R.nonzero().flatten().tolist():
        member_rows = N + (step.request_M == r).nonzero().flatten()
        logits_KV = torch.cat([logits_YV[index_R[r]][None], logits_YV[member_rows]])
        out_NV[index_R[r]] = MeanProb.from_logits(logits_KV, dim=0).to(out_NV.dtype)
    return out_NV


if __name__ == "__main__":  # python -m roe_vllm.aggregation: build the kernel now (make vllm does)
    import sys

    state = "ready" if kernel() else "not available; the member mean uses PyTorch"
    print(f"roe-vllm: member-mean kernel {state}", file=sys.stderr)
