"""top-k -> softmax, returned as dispatch data sorted by expert: JetMoe (MoE FFN and MoA attention).

    idx_TA = topk(logits_TE, A);  w_TA = softmax(logits_TE[idx_TA])
    -> (index_sorted_experts, batch_index, batch_gates, expert_size list, logits_TE)

Differs from ``TopKSoftmax`` only by the output: the dispatch tuple is rebuilt from the new
indices exactly as the router builds it. The logits are element 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roe.adapters.topk_softmax import TopKSoftmax


@dataclass(frozen=True)
class SortedDispatch(TopKSoftmax):
    name = "topk-softmax-dispatch"
    logits_index = 4
    fixed_k = ("its blocks read top_k outside the router (the MoA attention runs kv heads x top_k query heads and "
               "reshapes by top_k), so the number of experts per token is part of the architecture")

    def pack(self, router, output, weights_TA, idx_TA):
        logits_TE = output[4]
        expert_size = torch.bincount(idx_TA.flatten(), minlength=logits_TE.shape[-1]).tolist()
        _, order_N = idx_TA.flatten().sort(0)
        batch_index_N = order_N.div(idx_TA.shape[-1], rounding_mode="trunc")
        batch_gates_N = weights_TA.to(output[2].dtype).flatten()[order_N]
        return (order_N, batch_index_N, batch_gates_N, expert_size, logits_TE)
