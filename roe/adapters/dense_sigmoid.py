"""top-k of the logits, gate = a dense sigmoid matrix: Llama4.

    idx_TA = topk(logits_TE, A);   scores_TE = sigmoid(logits at idx, -inf elsewhere)  (0 off the top-k)

The router returns ``(scores_TE, logits_TE)``: the selection is implicit in the dense matrix,
which is rebuilt around the new indices. The logits are element 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roe.adapters.base import Rule


@dataclass(frozen=True)
class DenseSigmoid(Rule):
    name = "topk-dense-sigmoid"
    logits_index = 1

    def select(self, router, logits_TE):
        return torch.topk(logits_TE, self.k(router), dim=1).indices

    def weights(self, router, logits_TE, idx_TA):
        return logits_TE.gather(1, idx_TA)

    def pack(self, router, output, top_TA, idx_TA):
        logits_TE = output[1]
        dense_TE = torch.full_like(logits_TE, float("-inf")).scatter_(1, idx_TA, top_TA.to(logits_TE.dtype))
        return (torch.sigmoid(dense_TE.float()).to(logits_TE.dtype), logits_TE)
