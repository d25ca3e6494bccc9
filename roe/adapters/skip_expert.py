"""softmax + bias over the experts and one skip class: Zaya.

    p_TC = softmax(logits_TC) over C = E + 1 classes;  idx_TA = topk(p_TC + balancing_bias_C, A)
    w_TA = p_TC[idx_TA];  the skip class (index E) runs no expert: weight 0, index 0

Differs from ``SoftmaxBias`` by the skip class and the 4-tuple output, whose last element (the
router state carried to the next layer, computed before the selection) passes through. The
noise covers all C classes: skipping is one of the router's choices.
"""

from __future__ import annotations

from dataclasses import dataclass

from roe.adapters.softmax_bias import SoftmaxBias


@dataclass(frozen=True)
class SkipExpert(SoftmaxBias):
    name = "softmax-bias-skip"
    fixed_k = "its architecture supports one expert per token only (ZayaConfig refuses num_experts_per_tok != 1)"

    @classmethod
    def applies(cls, router):
        return super().applies(router) and hasattr(router, "num_experts")

    def pack(self, router, output, weights_TA, idx_TA):
        skip_TA = idx_TA == router.num_experts
        weights_TA = weights_TA.masked_fill(skip_TA, 0).to(output[1].dtype)
        return (output[0], weights_TA, idx_TA.masked_fill(skip_TA, 0).to(output[2].dtype), *output[3:])
