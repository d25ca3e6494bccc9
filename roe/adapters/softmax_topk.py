"""softmax -> top-k: OLMoE, Mixtral, Qwen2/3-MoE, Qwen3-Next, Qwen3.5-MoE, MiniMax, Jamba, ...

    probs_TE = softmax(logits_TE) in fp32;  idx_TA = topk(probs_TE, A)
    w_TA = probs_TE[idx_TA], divided by its sum when the model renormalises

Selection on softmax(logits + tau * G) ranks exactly like logits + tau * G (softmax is
monotone), so this is the paper's TopK(r + tau * G). Renormalisation is read from
``norm_topk_prob`` when the router has it; otherwise both variants are self-tested (Mixtral
always renormalises and has no attribute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roe.adapters.base import Rule


@dataclass(frozen=True)
class SoftmaxTopK(Rule):
    renormalise: bool = False

    name = "softmax-topk"

    @classmethod
    def candidates(cls, router):
        if not cls.applies(router):
            return []
        if hasattr(router, "norm_topk_prob"):
            return [cls(bool(router.norm_topk_prob))]
        return [cls(True), cls(False)]

    def select(self, router, logits_TE):
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        return torch.topk(probs_TE, self.k(router), dim=-1).indices

    def weights(self, router, logits_TE, idx_TA):
        weights_TA = torch.softmax(logits_TE.float(), dim=-1).gather(-1, idx_TA)
        if self.renormalise:
            weights_TA /= weights_TA.sum(dim=-1, keepdim=True)
        return weights_TA

    def describe(self):
        return f"{self.name} ({'renormalised' if self.renormalise else 'no renormalisation'})"
