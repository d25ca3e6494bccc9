"""PhiMoE sparsemixer, eval path: two sequential argmax picks.

    pick 1 = argmax l;  w1 = softmax(l with the experts outside the band of pick 1 masked)[pick 1]
    pick 2 = argmax of l with pick 1 at -inf;  w2 = the same on that masked l, for pick 2
    band of a pick p: experts j with (l_p - l_j) / max(|l_j|, l_p) <= 2 * router_jitter_noise

NOTE: the noisy logits decide the two picks (Gumbel top-2 without replacement); the weights are
the sparsemixer's on the clean logits with the band anchored at each pick. In eval the pick is
the max, so this is the model's own formula at tau = 0; for a pick that is not the max, the
experts above it stay inside its band. The training branch (its own Gumbel sampling and
PhimoeMultiplier) is not used. ``top_k`` is ignored, as the model ignores it (always 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roe.adapters.base import Rule


def band_gate(scores_TE: torch.Tensor, pick_T1: torch.Tensor, jitter_eps: float) -> torch.Tensor:
    """softmax over the experts inside the pick's relative band, taken at the pick [T, 1]."""
    top_T1 = scores_TE.gather(-1, pick_T1)
    factor_TE = scores_TE.abs().clamp(min=top_T1)
    masked_TE = scores_TE.masked_fill(((top_T1 - scores_TE) / factor_TE) > (2 * jitter_eps), float("-inf"))
    return torch.softmax(masked_TE, dim=-1).gather(-1, pick_T1)


@dataclass(frozen=True)
class SparseMixer(Rule):
    name = "sparsemixer"
    fixed_k = "its sparsemixer router always picks exactly 2 experts (it ignores num_experts_per_tok)"

    @classmethod
    def applies(cls, router):
        return hasattr(router, "router_jitter_noise")

    def model_k(self, router):
        return 2

    def select(self, router, logits_TE):
        first_T1 = logits_TE.max(dim=-1, keepdim=True)[1]
        second_T1 = logits_TE.scatter(-1, first_T1, float("-inf")).max(dim=-1, keepdim=True)[1]
        return torch.cat([first_T1, second_T1], dim=-1)

    def weights(self, router, logits_TE, idx_TA):
        eps = router.router_jitter_noise
        first_T1, second_T1 = idx_TA[:, :1], idx_TA[:, 1:]
        rest_TE = torch.scatter(logits_TE, -1, first_T1, float("-inf"))
        return torch.cat([band_gate(logits_TE, first_T1, eps), band_gate(rest_TE, second_T1, eps)], dim=-1)
