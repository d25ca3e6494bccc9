"""sigmoid + bias, weights normalised together with the shared experts: Inkling.

    s_TX = sigmoid(logits_TX) over E routed + S shared experts;  idx_TA = topk(s[:, :E] + bias_E, A)
    g = s at [idx_TA, shared] / their sum x route_scale x global_scale  ->  (w_TA, shared gammas_TS)

Differs from ``SigmoidBias`` by the joint normalisation and the 4-tuple output
``(routed logits, w, idx, shared gammas)``: the shared experts' gammas change with the
selection. The router returns only the routed logits, so ``bind`` recomputes the shared ones
with the router's own fp32 linear on the call's hidden states (bit for bit the same op).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from roe.adapters.sigmoid_bias import SigmoidBias, _signature


@dataclass(frozen=True)
class SharedGammas(SigmoidBias):
    shared_TS: torch.Tensor | None = field(default=None, compare=False, repr=False)

    name = "sigmoid-bias-shared"

    @classmethod
    def applies(cls, router):
        return super().applies(router) and hasattr(router, "n_shared_experts") and hasattr(router, "global_scale")

    @classmethod
    def candidates(cls, router):
        return [cls(sorted=s) for s in (False, True)] if cls.applies(router) else []

    def bind(self, router, args, kwargs):
        hidden = _signature(type(router)).bind_partial(router, *args, **kwargs).arguments.get("hidden_states")
        if hidden is None:
            return super().bind(router, args, kwargs)
        logits_TX = F.linear(hidden.reshape(-1, router.hidden_dim).float(), router.weight.float())
        return replace(super().bind(router, args, kwargs), shared_TS=logits_TX[..., -router.n_shared_experts:])

    def weights(self, router, logits_TE, idx_TA):
        chosen_TX = torch.cat([logits_TE.gather(-1, idx_TA), self.shared_TS], dim=-1)
        log_probs_TX = F.logsigmoid(chosen_TX)
        weights_TX = torch.exp(log_probs_TX - torch.logsumexp(log_probs_TX, dim=-1, keepdim=True))
        return weights_TX * router.route_scale * router.global_scale.float()

    def describe(self):
        return f"{self.name} ({'sorted' if self.sorted else 'unsorted'} top-k)"

    def pack(self, router, output, weights_TX, idx_TA):
        weights_TX = weights_TX.to(output[1].dtype)
        A = idx_TA.shape[-1]
        return (output[0], weights_TX[..., :A].contiguous(), idx_TA.to(output[2].dtype),
                weights_TX[..., A:].contiguous())
