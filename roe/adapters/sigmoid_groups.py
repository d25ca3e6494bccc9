"""sigmoid + correction bias + group-limited top-k: DeepSeek-V3 and kin (Glm4-MoE, Dots1, Kimi, Beam, ...).

    s_TE = sigmoid(logits_TE);  c_TE = s_TE + bias_E
    keep the topk_group groups with the largest sum of their top-2 c; top-k of c inside them
    w_TA = s_TE[idx_TA] (renormalised if norm_topk_prob) * routed_scaling_factor

Differs from ``SigmoidBias`` only by the group limit. NOTE: the noise goes on the logits used for
selection, before the sigmoid, before the bias is added and before group limiting, which is
kept: c' = sigmoid(logits + tau * G) + bias. The weights stay the clean sigmoid scores. The
Gumbel "sample from softmax" reading does not hold for a sigmoid router; the perturbation is
the same in kind (a temperature on the logits). Beam (sorted top-k, scaling in the block) is a
self-tested variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from roe.adapters.sigmoid_bias import SigmoidBias


@dataclass(frozen=True)
class SigmoidGroups(SigmoidBias):
    name = "sigmoid-bias-groups"
    fill: ClassVar[float] = float("-inf")  # the choice value of experts in dropped groups

    @classmethod
    def applies(cls, router):
        grouped = getattr(router, "num_group", None) is not None and hasattr(router, "topk_group")
        return grouped and super().applies(router)

    def group_scores(self, choice_TGE):
        return choice_TGE.topk(2, dim=-1)[0].sum(dim=-1)

    def select(self, router, logits_TE):
        choice_TE = self.choice(router, logits_TE)
        T, E = choice_TE.shape
        groups = router.num_group
        group_scores = self.group_scores(choice_TE.view(T, groups, E // groups))
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, E // groups).reshape(-1, E)
        choice_TE = choice_TE.masked_fill(~score_mask.bool(), self.fill)
        return torch.topk(choice_TE, k=self.k(router), dim=-1, sorted=self.sorted)[1]
