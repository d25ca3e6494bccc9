"""top-k -> softmax: GPT-OSS, GraniteMoE (+Shared, Hybrid), ...

    idx_TA = topk(logits_TE, A);   w_TA = softmax(logits_TE[idx_TA])

The weights are a softmax over the selected logits only; with noise the selection runs on
logits + tau * G and the weights on the clean logits at those indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roe.adapters.base import Rule


@dataclass(frozen=True)
class TopKSoftmax(Rule):
    name = "topk-softmax"

    def select(self, router, logits_TE):
        return torch.topk(logits_TE, self.k(router), dim=-1).indices

    def weights(self, router, logits_TE, idx_TA):
        return torch.softmax(logits_TE.gather(-1, idx_TA), dim=-1)
