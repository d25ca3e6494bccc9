"""The routing-rule base class: re-select a router's experts from perturbed logits.

Shapes: T rows, E experts, A experts per token (the model's top-k).

A v5 router returns ``(router_logits_TE, weights_TA, index_TA)``. An adapter never recomputes
the logits: the router runs as usual, then the rule re-runs *the router's own selection*
on ``logits + tau * G`` and evaluates *the router's own gating* at the new indices:

    idx_TA = rule.select(router, logits_TE + noise_TE)
    w_TA   = rule.weights(router, logits_TE, idx_TA)

NOTE: selection only. The gate weights are the clean values the router would give the
selected experts (softmax probabilities gathered at idx, renormalised exactly when the model
renormalises; softmax over the selected logits for top-k-then-softmax routers; sigmoid scores x
scaling for DeepSeek-style routers). With ``noisy_weights`` the weights are evaluated on the
perturbed logits instead; it is an option, off by default.

The experts per token: a rule selects ``k(router)`` experts, the model's own ``model_k`` unless
``top_k`` is set (``RoEConfig.experts_per_token``, the MoE-PHDS sparsity dial, arXiv 2509.23012).
Selection and gating then run exactly as the router's own code would with ``top_k = k``: top-k
of the same scores, the same renormalisation and scaling over the k chosen. A rule whose
model fixes k says why in ``fixed_k`` and is refused any other k.

``reroute`` also receives the router call's ``args``/``kwargs``: ``bind`` lets a rule take what
the block passes in (a correction bias given as a forward argument, the hidden states).

Because clean rows get an exact-zero perturbation and ``select``/``weights`` repeat the
router's own operations, a rule reproduces the router bit for bit at tau = 0. ``install``
checks exactly that on each router before enabling it (the tau = 0 self-test), and picks among
a rule's variants (e.g. renormalised or not) the one that passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class Rule:
    """One routing rule; subclasses state only their difference.

    ``name`` appears in ``roe models``. ``candidates`` yields the parameter variants
    worth self-testing for a router (an attribute such as ``norm_topk_prob`` pins one).
    ``top_k``: the experts per token to select (None: the model's own, ``model_k``).
    """

    top_k: int | None = field(default=None, kw_only=True)

    name: ClassVar[str] = "base"
    logits_index: ClassVar[int] = 0
    fixed_k: ClassVar[str | None] = None  # why the model cannot run another k (None: it can)

    @classmethod
    def candidates(cls, router: torch.nn.Module) -> list[Rule]:
        return [cls()] if cls.applies(router) else []

    @classmethod
    def applies(cls, router: torch.nn.Module) -> bool:
        return hasattr(router, "top_k")

    def model_k(self, router: torch.nn.Module) -> int:
        """The model's own experts per token for this router."""
        return router.top_k

    def k(self, router: torch.nn.Module) -> int:
        """The experts per token this rule selects."""
        return self.model_k(router) if self.top_k is None else self.top_k

    def with_k(self, k: int | None) -> Rule:
        """This rule selecting ``k`` experts per token (None: the model's own)."""
        return replace(self, top_k=k)

    def logits(self, router: torch.nn.Module, output: Any) -> torch.Tensor:
        """The router logits [T, E] inside the router's output."""
        return output[self.logits_index]

    def select(self, router: torch.nn.Module, logits_TE: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, router: torch.nn.Module, logits_TE: torch.Tensor, idx_TA: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pack(self, router: torch.nn.Module, output: Any, weights_TA: torch.Tensor, idx_TA: torch.Tensor) -> Any:
        """Rebuild the router's output with the new weights and indices (same dtypes)."""
        return (output[0], weights_TA.to(output[1].dtype), idx_TA.to(output[2].dtype))

    def bind(self, router: torch.nn.Module, args: tuple, kwargs: dict) -> Rule:
        """This rule for one call of the router: a rule that needs something the block passes in
        (a correction bias given as a forward argument, the hidden states) returns a copy holding it."""
        return self

    def reroute(self, router: torch.nn.Module, output: Any, noise_TE: torch.Tensor, noisy_weights: bool,
                args: tuple = (), kwargs: dict | None = None) -> Any:
        """Re-select from ``logits + noise``; ``args``/``kwargs`` are the router call's arguments."""
        rule = self.bind(router, args, kwargs or {})
        logits_TE = rule.logits(router, output)
        noisy_TE = logits_TE + noise_TE
        idx_TA = rule.select(router, noisy_TE)
        weights_TA = rule.weights(router, noisy_TE if noisy_weights else logits_TE, idx_TA)
        return rule.pack(router, output, weights_TA, idx_TA)

    def describe(self) -> str:
        return self.name


def outputs_equal(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of router outputs (tensors or tuples of tensors)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(outputs_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def self_test(rule: Rule, router: torch.nn.Module, output: Any, args: tuple = (), kwargs: dict | None = None) -> bool:
    """tau = 0: the rule must reproduce the router's own output (from the same call) exactly."""
    try:
        logits_TE = rule.logits(router, output)
        rerouted = rule.reroute(router, output, torch.zeros_like(logits_TE), False, args, kwargs)
    except (RuntimeError, IndexError, ValueError, TypeError, AttributeError, KeyError):
        return False
    return outputs_equal(rerouted, output)
