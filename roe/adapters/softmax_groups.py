"""softmax + group-limited top-k, no bias: DeepSeek-V2, Mistral4.

    p_TE = softmax(logits_TE);  keep the topk_group best groups;  idx_TA = topk(p masked with 0.0)
    w_TA = p_TE[idx_TA] (renormalised if the model does) * routed_scaling_factor

Differs from ``SigmoidGroups`` by the softmax, no bias and dropped groups filled with 0.0. A
group's score is the sum of its top-2 probabilities (Mistral4) or, for DeepSeek-V2's
``topk_method='group_limited_greedy'``, its max; ``'greedy'`` has no group limit. The noise goes
on the logits, before the softmax and the group limit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from roe.adapters.sigmoid_bias import SigmoidBias
from roe.adapters.sigmoid_groups import SigmoidGroups


@dataclass(frozen=True)
class SoftmaxGroups(SigmoidGroups):
    group_max: bool = False

    name = "softmax-groups"
    fill = 0.0

    @classmethod
    def applies(cls, router):
        return hasattr(router, "top_k") and hasattr(router, "topk_group")

    @classmethod
    def candidates(cls, router):
        group_max = getattr(router, "topk_method", None) == "group_limited_greedy"
        return [replace(rule, group_max=group_max) for rule in super().candidates(router)]

    def bind(self, router, args, kwargs):
        return self

    def scores(self, router, logits_TE):
        return torch.softmax(logits_TE.float() if self.upcast else logits_TE, dim=-1)

    def group_scores(self, choice_TGE):
        return choice_TGE.max(dim=-1).values if self.group_max else super().group_scores(choice_TGE)

    def select(self, router, logits_TE):
        if getattr(router, "topk_method", None) == "greedy":
            return SigmoidBias.select(self, router, logits_TE)
        return super().select(router, logits_TE)
