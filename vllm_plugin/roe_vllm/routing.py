"""Noisy re-selection of the member rows' experts inside vLLM's fused-MoE router.

Shapes: T clean rows, M member rows, E experts, A experts per token.

Every fused-MoE layer routes through ``router.select_experts(hidden, logits)``. For a forward with
member rows, the clean rows keep the router's own result; the member rows are routed again:

    ids_MA = the router's own selection on logits_ME + tau_l * G_ME      (roe/routing.py keyed noise)
    w_MA   = the router's gating of the CLEAN logits at ids_MA           (``CleanWeights``)

NOTE: selection only, as in roe (DESIGN §1): running the router's own ``_select_experts`` on the
noisy logits keeps its bias and group limiting exactly; the weights are the clean values the
router would give those experts (renormalised exactly when it renormalises). ``CleanWeights``
restates each router's gating formula; the first call of every router (vLLM's start-up warm-up
forward) checks that it reproduces the router's own weights at its own ids, bit for bit, and
refuses to start otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CleanWeights:
    """The gating of a vLLM router as a function of (logits, chosen ids): [T, E], [T, A] -> [T, A]."""

    scoring: str  # "softmax" | "sigmoid"
    renormalize: bool
    grouped: bool
    scaling: float

    @classmethod
    def of(cls, router) -> CleanWeights:
        """The rule of a router, or a ValueError naming what is not supported."""
        name = type(router).__name__
        if getattr(router, "eplb_state", None) is not None:
            raise ValueError("RoE on vLLM does not support EPLB (redundant experts remap the chosen ids)")
        if getattr(router, "custom_routing_function", None) is not None:
            raise ValueError(f"RoE on vLLM does not support {name} with a custom routing function")
        scoring = getattr(router, "scoring_func", "softmax")
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"RoE on vLLM does not support {name} with scoring {scoring!r}")
        grouped = bool(getattr(router, "use_grouped_topk", False))
        if not grouped and scoring != "softmax":
            raise ValueError(f"RoE on vLLM does not support {name}: ungrouped {scoring} routing is untested")
        return cls(scoring=scoring, renormalize=bool(getattr(router, "renormalize", True)), grouped=grouped,
                   scaling=float(getattr(router, "routed_scaling_factor", 1.0) or 1.0))

    def __call__(self, logits_TE: torch.Tensor, ids_TA: torch.Tensor) -> torch.Tensor:
        ids_TA = ids_TA.long()
        if not self.grouped:  # CPURouter._softmax_topk / fused top-k softmax
            chosen_TA = logits_TE.gather(-1, ids_TA)
            if self.renormalize:
                return torch.softmax(chosen_TA, dim=-1).to(torch.float32)
            return (chosen_TA - torch.logsumexp(logits_TE, dim=-1, keepdim=True)).exp().to(torch.float32)
        logits_TE = logits_TE.float()
        scores_TE = torch.softmax(logits_TE, dim=-1) if self.scoring == "softmax" else logits_TE.sigmoid()
        weights_TA = scores_TE.gather(-1, ids_TA)
        if self.renormalize:
            weights_TA = weights_TA / weights_TA.sum(dim=-1, keepdim=True)
        return weights_TA * self.scaling if self.scaling != 1.0 else weights_TA


def self_test(rule: CleanWeights, router, logits_TE: torch.Tensor, weights_TA: torch.Tensor,
              ids_TA: torch.Tensor) -> None:
    """The rule must give the router's own weights at its own ids (tau = 0), or RoE refuses the model."""
    if logits_TE.shape[0] == 0:
        return
    mine_TA = rule(logits_TE, ids_TA)
    if mine_TA.shape != weights_TA.shape or not torch.equal(mine_TA, weights_TA.to(mine_TA.dtype)):
        raise ValueError(f"RoE on vLLM: the clean gate weights of {type(router).__name__} ({rule}) do not reproduce "
                         "the router's own weights at tau = 0; this router is not supported")


def install(router, layer: int, step_of) -> None:
    """Wrap one router instance: member rows of the current step re-select with noise.

    ``step_of()`` returns the current forward's ``Step`` (roe_vllm/members.py) or None. The router runs
    once, on the logits with the member rows' noise added (the clean rows get none, so their result is
    the router's own); then the member rows get the clean gate weights at their noisy choice.
    """
    rule = CleanWeights.of(router)
    original = router.select_experts
    tested = []

    def select_experts(hidden_states, router_logits, topk_indices_dtype=None, *, input_ids=None):
        step = step_of()
        noise_ME = None
        if step is not None and step.wide:
            noise_ME = step.noise(layer, router_logits.shape[-1])
        if noise_ME is None:
            weights_TA, ids_TA = original(hidden_states, router_logits, topk_indices_dtype, input_ids=input_ids)
            T = router_logits.shape[0]
        else:
            T = step.rows
            if router_logits.shape[0] != T + step.num_members:
                raise RuntimeError(f"RoE: MoE layer {layer} routed {router_logits.shape[0]} rows, expected {T} + "
                                   f"{step.num_members} (rows gathered or split before routing are not supported)")
            noisy_TE = router_logits.clone()
            noisy_TE[T:] += noise_ME.to(dtype=noisy_TE.dtype, device=noisy_TE.device)
            weights_TA, ids_TA = original(hidden_states, noisy_TE, topk_indices_dtype, input_ids=input_ids)
            weights_TA[T:] = rule(router_logits[T:], ids_TA[T:]).to(weights_TA.dtype)
        if not tested:
            self_test(rule, router, router_logits[:T], weights_TA[:T], ids_TA[:T])
            tested.append(True)
        return weights_TA, ids_TA

    router.select_experts = select_experts
