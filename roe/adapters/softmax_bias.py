"""softmax + correction bias (no groups): Ernie-4.5-MoE, LongCat-Flash.

    p_TE = softmax(logits_TE);  idx_TA = topk(p_TE + bias_E, A);  w_TA = p_TE[idx_TA]

Differs from ``SigmoidBias`` by the softmax, and by Ernie's renormalisation, which clamps the
sum from below by ``norm_min``. The noise goes on the logits, before the softmax and the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roe.adapters.sigmoid_bias import SigmoidBias, router_bias


@dataclass(frozen=True)
class SoftmaxBias(SigmoidBias):
    name = "softmax-bias"

    @classmethod
    def applies(cls, router):
        return super().applies(router) and router_bias(router) is not None

    def scores(self, router, logits_TE):
        return torch.softmax(logits_TE.float() if self.upcast else logits_TE, dim=-1)

    def normalise(self, router, weights_TA):
        if getattr(router, "norm_min", None) is None:
            return super().normalise(router, weights_TA)
        return weights_TA / torch.clamp(weights_TA.sum(dim=-1, keepdim=True), min=router.norm_min)
