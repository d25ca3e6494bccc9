"""correction bias on the logits: Kolibri1.

    idx_TA = topk(logits_TE + bias_E, A);   w_TA = sigmoid(logits_TE[idx_TA]) (renormalised)

Differs from ``SigmoidBias`` only by adding the bias to the logits instead of the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from roe.adapters.sigmoid_bias import SigmoidBias, router_bias


@dataclass(frozen=True)
class LogitBias(SigmoidBias):
    name = "logit-bias"

    @classmethod
    def applies(cls, router):
        return super().applies(router) and router_bias(router) is not None

    def choice(self, router, logits_TE):
        return logits_TE + self.bias_E
