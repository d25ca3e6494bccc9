"""sigmoid + correction bias + group-limited top-k: DeepSeek-V3 and kin (Glm4-MoE, Dots1, Kimi, ...).

    s_TE = sigmoid(logits_TE);  c_TE = s_TE + bias_E
    keep the topk_group groups with the largest sum of their top-2 c; top-k of c inside them
    w_TA = s_TE[idx_TA] (renormalised if norm_topk_prob) * routed_scaling_factor

NOTE: the noise goes on the logits used for selection, before the sigmoid, before the bias is
added and before group limiting, which is kept: c' = sigmoid(logits + tau * G) + bias. The
weights stay the clean sigmoid scores. The Gumbel "sample from softmax" reading does not hold
for a sigmoid router; the perturbation is the same in kind (a temperature on the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roe.adapters.base import Rule


@dataclass(frozen=True)
class SigmoidGroups(Rule):
    name = "sigmoid-bias-groups"
    summary = "sigmoid scores + correction bias, group-limited top-k, clean scores x scaling"

    @classmethod
    def applies(cls, router):
        return all(hasattr(router, a) for a in ("top_k", "e_score_correction_bias", "num_group", "topk_group"))

    def select(self, router, logits_TE):
        choice_TE = logits_TE.sigmoid() + router.e_score_correction_bias
        T, E = choice_TE.shape
        groups = router.num_group
        group_scores = choice_TE.view(T, groups, E // groups).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, E // groups).reshape(-1, E)
        choice_TE = choice_TE.masked_fill(~score_mask.bool(), float("-inf"))
        return torch.topk(choice_TE, k=router.top_k, dim=-1, sorted=False)[1]

    def weights(self, router, logits_TE, idx_TA):
        weights_TA = logits_TE.sigmoid().gather(1, idx_TA)
        if router.norm_topk_prob:
            weights_TA /= weights_TA.sum(dim=-1, keepdim=True) + 1e-20
        return weights_TA * router.routed_scaling_factor
