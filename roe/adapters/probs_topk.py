"""softmax -> top-k when the router returns probabilities, with a per-expert scale: Gemma4.

    p_TE = the router's output 0;  idx_TA = topk(log p_TE + tau * G, A)
    w_TA = p_TE[idx_TA] / sum x per_expert_scale[idx_TA]

NOTE: log p = logits - logsumexp(logits) shifts each row by a constant, so log p + tau * G ranks
exactly like logits + tau * G: the same selection as noise on the logits. The log is taken in
float64, where it keeps distinct fp32 / bf16 probabilities distinct, so the clean selection is
the router's own. Top-k comes from ``config.top_k_experts`` (the router has no ``top_k``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roe.adapters.base import Rule


@dataclass(frozen=True)
class ProbsTopK(Rule):
    name = "probs-topk"

    @classmethod
    def applies(cls, router):
        return hasattr(router, "per_expert_scale") and hasattr(getattr(router, "config", None), "top_k_experts")

    def model_k(self, router):
        return router.config.top_k_experts

    def reroute(self, router, output, noise_TE, noisy_weights, args=(), kwargs=None):
        probs_TE = output[0]
        choice_TE = probs_TE.double().log() + noise_TE
        idx_TA = torch.topk(choice_TE, k=self.k(router), dim=-1).indices
        gate_TE = torch.softmax(choice_TE, dim=-1).to(probs_TE.dtype) if noisy_weights else probs_TE
        weights_TA = gate_TE.gather(-1, idx_TA)
        weights_TA /= weights_TA.sum(dim=-1, keepdim=True)
        weights_TA = weights_TA * router.per_expert_scale[idx_TA]
        return (output[0], weights_TA.to(output[1].dtype), idx_TA.to(output[2].dtype))
