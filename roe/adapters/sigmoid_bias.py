"""score -> biased top-k (no groups): MiniMax-M2/M3, HY-V3, AfMoE, LFM2-MoE, Laguna, DeepSeek-V4, Inkling2, Flint.

    s_TE = act(logits_TE)   (sigmoid, or the router's own ``score_fn``: DeepSeek-V4 sqrtsoftplus)
    idx_TA = topk(s_TE + bias_E, A);   w_TA = s_TE[idx_TA], renormalised (+ eps), x scale

NOTE: the noise goes on the logits, before the activation and the bias, as in every rule: the choice
is act(logits + tau * G) + bias; the weights stay the clean scores. The bias is a tensor the
block passes as a forward argument (MiniMax-M2, HY-V3 ``e_score_correction_bias``; AfMoE, LFM2
``expert_bias``, None when LFM2 has none), else the router's own buffer, else absent (Flint).
Laguna's optional tanh softcap is already applied to the logits the router returns, so its noise
goes on the capped logits.

What the router's attributes do not pin is self-tested: scores in fp32 or in the logits' dtype,
sorted top-k or not, renormalisation (pinned by ``norm_topk_prob``) and its epsilon (1e-20 adds
nothing to a sum of scores in any float format; LFM2 uses 1e-6), and which scaling attribute
multiplies the weights (none: Laguna, MiniMax-M3 and Beam scale in the block).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, replace
from itertools import chain

import torch

from roe.adapters.base import Rule

BIAS_NAMES = ("e_score_correction_bias", "expert_bias", "balancing_biases")
SCALE_NAMES = ("routed_scaling_factor", "router_scaling_factor", "route_scale")


@functools.cache
def _signature(router_cls: type) -> inspect.Signature:
    return inspect.signature(router_cls.forward)


def router_bias(router: torch.nn.Module) -> torch.Tensor | None:
    """The router's own correction-bias tensor (a buffer or frozen parameter, possibly in a child)."""
    for name, tensor in chain(router.named_buffers(), router.named_parameters()):
        if name.rsplit(".", 1)[-1] in BIAS_NAMES:
            return tensor
    return None


def call_bias(router: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The bias of one call: a forward argument named like a bias, else the router's own."""
    call = _signature(type(router)).bind_partial(router, *args, **kwargs).arguments
    for name in BIAS_NAMES:
        if name in call:
            return call[name]
    return router_bias(router)


@dataclass(frozen=True)
class SigmoidBias(Rule):
    upcast: bool = False
    sorted: bool = True
    renorm_eps: float | None = 0.0
    scale: str | None = None
    bias_E: torch.Tensor | None = field(default=None, compare=False, repr=False)

    name = "sigmoid-bias"

    @classmethod
    def candidates(cls, router):
        if not cls.applies(router):
            return []
        if hasattr(router, "norm_topk_prob"):
            renorms = [0.0, 1e-6] if router.norm_topk_prob else [None]
        else:
            renorms = [0.0, 1e-6, None]
        scales = [n for n in SCALE_NAMES if hasattr(router, n)] + [None]
        return [cls(upcast, srt, eps, scale)
                for upcast in (False, True) for srt in (True, False) for eps in renorms for scale in scales]

    def bind(self, router, args, kwargs):
        return replace(self, bias_E=call_bias(router, args, kwargs))

    def scores(self, router, logits_TE):
        logits_TE = logits_TE.float() if self.upcast else logits_TE
        return router.score_fn(logits_TE) if hasattr(router, "score_fn") else logits_TE.sigmoid()

    def choice(self, router, logits_TE):
        scores_TE = self.scores(router, logits_TE)
        return scores_TE if self.bias_E is None else scores_TE + self.bias_E

    def select(self, router, logits_TE):
        return torch.topk(self.choice(router, logits_TE), self.k(router), dim=-1, sorted=self.sorted).indices

    def normalise(self, router, weights_TA):
        return weights_TA / (weights_TA.sum(dim=-1, keepdim=True) + self.renorm_eps)

    def chosen_scores(self, router, logits_TE, idx_TA):
        """The scores of the chosen experts [T, A]: all scores, then gathered (these routers' order)."""
        return self.scores(router, logits_TE).gather(-1, idx_TA)

    def weights(self, router, logits_TE, idx_TA):
        weights_TA = self.chosen_scores(router, logits_TE, idx_TA)
        if self.renorm_eps is not None:
            weights_TA = self.normalise(router, weights_TA)
        return weights_TA if self.scale is None else weights_TA * getattr(router, self.scale)

    def describe(self):
        renorm = "no renormalisation" if self.renorm_eps is None else f"renormalised (eps {self.renorm_eps:g})"
        return (f"{self.name} ({'fp32' if self.upcast else 'native'} scores, {'sorted' if self.sorted else 'unsorted'}"
                f" top-k, {renorm}, scale {self.scale or 'none'})")
