"""Noisy re-selection of the member rows' experts inside vLLM's fused-MoE router, and the experts-per-token dial.

Shapes: T clean rows, M member rows, R = T + M routed rows, E experts, A experts per token (the model's),
k a dialled experts per token, W the routing's width.

Every fused-MoE layer routes through ``router.select_experts(hidden, logits)``. For a forward with
member rows, the clean rows keep the router's own result; the member rows are routed again:

    ids_MA = the router's own selection on logits_ME + tau_l * G_ME      (roe/routing.py keyed noise)
    w_MA   = the router's gating of the CLEAN logits at ids_MA           (``CleanWeights``)

NOTE: selection only, as in roe (roe/adapters/base.py): a router that limits groups selects the member rows
itself, on their noisy logits, which keeps its bias and group limiting exactly; a plain top-k router's
choice is the same ``torch.topk`` restated (``CleanWeights.select``). The weights are the clean values the
router would give those experts (renormalised exactly when it renormalises). ``CleanWeights``
restates each router's gating formula; the first call of every router (vLLM's start-up warm-up
forward) checks that it reproduces the router's own weights at its own ids, bit for bit, and
refuses to start otherwise.

The experts-per-token dial (``experts_per_token``, MoE-PHDS arXiv 2509.23012): every row of a request
that dials k (its prefill, its clean row, its members) selects k experts as the router's own code would
with ``top_k = k`` (top-k of the same, possibly noisy, logits) and gets the clean gating of those k
(renormalised over the k exactly when the router renormalises). The fused MoE takes its top-k from the
width of the routing tensors, so one forward routes W = max(A, largest k) columns:

    ids_RW = [ids_Rk, ids_Rk[:, :1] ...]      w_RW = [w_Rk, 0 ...]

NOTE: padding columns repeat the row's first chosen expert with weight exactly 0. The CPU kernel sums
the columns in order, so w * y + 0 * y' = w * y bit for bit, and y' is the output of an expert the row
really runs (finite whenever the row's output is): no NaN or inf can come from a padding column, and no
unused expert's weights are read. k > A works the same way (W = k), up to the router's E experts.
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

    def select(self, logits_TE: torch.Tensor, k: int) -> torch.Tensor:
        """The router's own choice of k experts [T, k] (CPURouter._softmax_topk's top-k: raw logits, unsorted)."""
        if self.grouped:
            # NOTE: group-limited selection with another k is not restated here; no supported architecture
            # (roe_vllm/architectures.py) routes by groups, and the frontend never admits one.
            raise ValueError("RoE on vLLM: experts_per_token is not supported with grouped routing")
        return torch.topk(logits_TE, k, dim=-1, sorted=False).indices

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


def dial(rule: CleanWeights, logits_RE: torch.Tensor, noisy_RE: torch.Tensor, weights_RA: torch.Tensor,
         ids_RA: torch.Tensor, k_R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with k_R > 0 re-selected with k experts (noisy_RE: the logits they select on), W columns for all.

    R routed rows (clean and member), A the router's own k; k_R = 0 or A keeps the router's result.
    """
    A = ids_RA.shape[1]
    W = max(A, int(k_R.max()))
    pad_RW = ids_RA[:, :1].expand(-1, W)
    ids_RW = torch.cat([ids_RA, pad_RW[:, A:]], dim=1)
    weights_RW = torch.cat([weights_RA, weights_RA.new_zeros(weights_RA.shape[0], W - A)], dim=1)
    for k in k_R.unique().tolist():
        if k in (0, A):
            continue
        rows_n = (k_R == k).nonzero().squeeze(1)
        ids_nk = rule.select(noisy_RE[rows_n], k)
        ids_RW[rows_n] = torch.cat([ids_nk, ids_nk[:, :1].expand(-1, W - k)], dim=1).to(ids_RW.dtype)
        weights_RW[rows_n] = torch.cat([rule(logits_RE[rows_n], ids_nk).to(weights_RW.dtype),
                                        weights_RW.new_zeros(rows_n.shape[0], W - k)], dim=1)
    return weights_RW.contiguous(), ids_RW.contiguous()


def _member_k(step) -> torch.Tensor | None:
    """k of each member row [M] (0: the model's own), None when no member dials; once per step."""
    if "experts_per_token" not in step.cache:
        k_R = torch.tensor([r.roster.experts_per_token or 0 for r in step.requests], dtype=torch.long)
        step.cache["experts_per_token"] = k_R[step.request_M] if bool(k_R.any()) else None
    return step.cache["experts_per_token"]


def _rows_k(table, step, T: int, rows: int) -> torch.Tensor | None:
    """k of every routed row [T (+ M)] of this forward, or None when none dials."""
    k_T = table.experts_per_row() if table is not None else None
    k_M = _member_k(step) if step is not None and step.wide and rows > T else None
    if k_T is None and k_M is None:
        return None
    if k_T is None:
        k_T = torch.zeros(T, dtype=torch.long)
    if k_T.shape[0] != T:
        raise RuntimeError(f"RoE: the forward has {T} token rows but its requests schedule {k_T.shape[0]}")
    if k_M is None:
        k_M = torch.zeros(rows - T, dtype=torch.long)
    return torch.cat([k_T, k_M])


def install(router, layer: int, step_of) -> None:
    """Wrap one router instance: member rows of the current step re-select with noise, dialled rows with k.

    ``step_of()`` returns the current forward's ``Step`` (roe_vllm/members.py) or None. The clean rows get
    the router's own result. The member rows select on their logits with the noise added: through the
    router itself where it limits groups (its exact group logic), by its plain top-k otherwise; then they
    get the clean gate weights at their noisy choice, and rows of requests that dial
    ``experts_per_token`` are re-selected with their k (``dial``).
    NOTE: called while vLLM builds the model, inside its ``set_current_vllm_config``: the engine's batch
    table (roe_vllm/requests.py, per-row k) is found through that config, as the model finds it.
    """
    from vllm.config import get_current_vllm_config

    from roe_vllm.requests import table_for

    rule = CleanWeights.of(router)
    original = router.select_experts
    vllm_config = get_current_vllm_config()
    _check_experts(router, vllm_config)
    tested = []
    # the router's selection is a plain top-k of the logits (CPURouter, ungrouped softmax; CleanWeights.of has refused
    # custom functions and other scorings): member rows can be selected without running the router on them
    plain = type(router).__name__ == "CPURouter" and not rule.grouped

    def select_experts(hidden_states, router_logits, topk_indices_dtype=None, *, input_ids=None):
        step = step_of()
        noise_ME = None
        if step is not None and step.wide:
            noise_ME = step.noise(layer, router_logits.shape[-1])
        noisy_TE = router_logits
        if noise_ME is None:
            weights_TA, ids_TA = original(hidden_states, router_logits, topk_indices_dtype, input_ids=input_ids)
            T = step.rows if step is not None and step.wide else router_logits.shape[0]
        else:
            T = step.rows
            if router_logits.shape[0] != T + step.num_members:
                raise RuntimeError(f"RoE: MoE layer {layer} routed {router_logits.shape[0]} rows, expected {T} + "
                                   f"{step.num_members} (rows gathered or split before routing are not supported)")
            noisy_ME = router_logits[T:] + noise_ME.to(dtype=router_logits.dtype, device=router_logits.device)
            if plain:
                # NOTE: the router's own top-k restated (CPURouter._softmax_topk): the clean rows alone through the
                # router, the member rows' choice by the same torch.topk, with no full-batch clone and no gating of
                # the noisy logits that the clean weights below replace.
                weights_TA, ids_TA = original(hidden_states[:T], router_logits[:T], topk_indices_dtype,
                                              input_ids=input_ids)
                ids_MA = rule.select(noisy_ME, ids_TA.shape[1]).to(ids_TA.dtype)
                weights_MA = rule(router_logits[T:], ids_MA).to(weights_TA.dtype)
                weights_TA, ids_TA = torch.cat([weights_TA, weights_MA]), torch.cat([ids_TA, ids_MA])
                noisy_TE = None
            else:
                noisy_TE = torch.cat([router_logits[:T], noisy_ME])
                weights_TA, ids_TA = original(hidden_states, noisy_TE, topk_indices_dtype, input_ids=input_ids)
                weights_TA[T:] = rule(router_logits[T:], ids_TA[T:]).to(weights_TA.dtype)
        if not tested:
            self_test(rule, router, router_logits[:T], weights_TA[:T], ids_TA[:T])
            tested.append(True)
        k_R = _rows_k(table_for(vllm_config), step, T, router_logits.shape[0])
        if k_R is not None:
            if noisy_TE is None:
                noisy_TE = torch.cat([router_logits[:T], noisy_ME])
            return dial(rule, router_logits, noisy_TE, weights_TA, ids_TA, k_R)
        return weights_TA, ids_TA

    router.select_experts = select_experts


def _check_experts(router, vllm_config) -> None:
    """The frontend checks experts_per_token with the config's (E, k): the router must have the same."""
    from roe_vllm.architectures import moe_experts

    expected = moe_experts(vllm_config.model_config.hf_config)
    found = (router.global_num_experts, router.top_k)
    if expected is not None and expected != found:
        raise ValueError(f"RoE: a router has {found[0]} experts and top-k {found[1]} but the config says "
                         f"{expected}; roe_vllm.architectures.moe_experts is wrong for this model")
