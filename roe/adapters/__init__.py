"""Router discovery and adapter selection, from the model itself.

1. ``find_routers``: the router classes are the ones the model records ``router_logits`` from
   (``_can_record_outputs["router_logits"]``, one recorder or a list, searched through
   sub-models for multimodal wrappers); every instance is one MoE layer, in module order. A
   recorded module that contains another recorded one is a wrapper, not a router (JetMoe
   records its attention, whose inner router is recorded too).
   NOTE: MoE layers whose router the model does not record have no learned selection to
   perturb and stay clean (DeepSeek-V4 hash layers: experts fixed by token id); they are not
   roster layers, so the schedule has one entry per *recorded* router.
2. ``probe``: one short clean forward captures each router's real call and output.
3. ``choose_rule``: every registered rule variant that applies to the router is run on that
   captured call and output with zero noise; the first to reproduce it bit for bit is used. A
   router no rule reproduces is refused, naming the family and the rules tried, or, when its
   output for a token changes with the other tokens of the forward (``locality``), saying so:
   no per-token rule can exist for it.

4. ``dial``: ``RoEConfig.experts_per_token`` (the MoE-PHDS sparsity dial) gives every rule the
   number of experts to select, checked against each router's experts; a rule whose model
   fixes k (``Rule.fixed_k``) is refused any other k, naming the family and the reason.

No class-name list: a new transformers family that routes by a known rule works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from roe.adapters.base import Rule, self_test
from roe.adapters.dense_sigmoid import DenseSigmoid
from roe.adapters.locality import refuse_token_mixing
from roe.adapters.logit_bias import LogitBias
from roe.adapters.probs_topk import ProbsTopK
from roe.adapters.shared_gammas import SharedGammas
from roe.adapters.sigmoid_bias import SigmoidBias
from roe.adapters.sigmoid_groups import SigmoidGroups
from roe.adapters.skip_expert import SkipExpert
from roe.adapters.softmax_bias import SoftmaxBias
from roe.adapters.softmax_groups import SoftmaxGroups
from roe.adapters.softmax_topk import SoftmaxTopK
from roe.adapters.sorted_dispatch import SortedDispatch
from roe.adapters.sparsemixer import SparseMixer
from roe.adapters.topk_softmax import TopKSoftmax

# Order matters only where two rules agree on the probe: the more specific rule comes first.
RULES: list[type[Rule]] = [
    SigmoidGroups, SoftmaxGroups, SoftmaxBias, SoftmaxTopK, TopKSoftmax, SigmoidBias, LogitBias,
    SharedGammas, SkipExpert, ProbsTopK, DenseSigmoid, SparseMixer, SortedDispatch,
]


@dataclass
class RouterSlot:
    """One MoE layer's router: its module path, MoE ordinal, rule, and original forward.

    ``experts``: how many experts the router chooses from (its logits' width). ``dialled``: the
    rule selects another number of experts than the model, so clean rows are re-selected too.
    """

    path: str
    module: torch.nn.Module
    layer: int
    rule: Rule | None = None
    saved_forward: Any = None
    experts: int = 0
    dialled: bool = False


def router_classes(model: torch.nn.Module) -> tuple[type, ...]:
    """The classes the model or a sub-model records ``router_logits`` from."""
    found: list[type] = []
    for module in model.modules():
        recorder = getattr(type(module), "_can_record_outputs", None) or {}
        spec = recorder.get("router_logits") if isinstance(recorder, dict) else None
        for entry in spec if isinstance(spec, (list, tuple)) else [spec]:
            target = getattr(entry, "target_class", None) or (entry if isinstance(entry, type) else None)
            if isinstance(target, type) and target not in found:
                found.append(target)
    return tuple(found)


def find_routers(model: torch.nn.Module) -> list[RouterSlot]:
    """Every router of the model in module (= layer) order; raises if the model has none."""
    classes = router_classes(model)
    family = type(model).__name__
    if not classes:
        raise ValueError(
            f"{family} has no MoE layer: it declares no router_logits output. roe works on transformers "
            "Mixture-of-Experts causal LMs (OLMoE, Mixtral, Qwen-MoE, DeepSeek, GPT-OSS, ...); see `roe models`."
        )
    recorded = [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]
    routers = [(n, m) for n, m in recorded
               if not any(sub is not m and isinstance(sub, classes) for sub in m.modules())]
    if not routers:
        names = ", ".join(c.__name__ for c in classes)
        raise ValueError(f"{family} declares router classes {names} but contains no instance of them")
    return [RouterSlot(path=name, module=m, layer=i) for i, (name, m) in enumerate(routers)]


@torch.no_grad()
def probe(model: torch.nn.Module, slots: list[RouterSlot], seq_len: int = 12) -> dict[int, tuple[tuple, dict, Any]]:
    """Run one clean forward on random tokens; return each router's (args, kwargs, output) by MoE layer."""
    captured: dict[int, tuple[tuple, dict, Any]] = {}

    def hook(_module, args, kwargs, output, layer):
        captured.setdefault(layer, (args, kwargs, output))

    handles = [slot.module.register_forward_hook(lambda m, a, kw, out, layer=slot.layer: hook(m, a, kw, out, layer),
                                                 with_kwargs=True)
               for slot in slots]
    gen = torch.Generator().manual_seed(1234)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, seq_len), generator=gen).to(model.device)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def choose_rule(slot: RouterSlot, output: Any, family: str, args: tuple = (), kwargs: dict | None = None) -> Rule:
    """The first rule variant that reproduces this router's call exactly at tau = 0."""
    if isinstance(output, torch.Tensor):
        raise ValueError(
            f"{family}: router {type(slot.module).__name__} ({slot.path}) returns only its logits; the experts are "
            "chosen by the block that calls it, outside any router, so roe can neither re-select them nor verify a "
            f"re-selection (tau = 0 self-test). {family} is not supported."
        )
    tried = []
    for rule_cls in RULES:
        for rule in rule_cls.candidates(slot.module):
            tried.append(rule.describe())
            if self_test(rule, slot.module, output, args, kwargs):
                return rule
    refuse_token_mixing(slot.module, slot.path, family, args, kwargs or {})
    raise ValueError(
        f"{family}: no roe routing rule reproduces router {type(slot.module).__name__} ({slot.path}) at tau = 0 "
        f"(tried {len(tried)} variants of: {', '.join(dict.fromkeys(t.split(' (')[0] for t in tried)) or 'none'}). "
        f"Supported rules: {', '.join(r.name for r in RULES)}. See `roe models`."
    )


def resolve_rules(model: torch.nn.Module, slots: list[RouterSlot]) -> None:
    """Probe and self-test every router; each slot gets its rule or an error is raised."""
    if any(getattr(slot.module.__dict__.get("forward"), "roe_dialled", False) for slot in slots):
        # the probe would see the other roster's k: a second roster cannot be made meanwhile
        raise RuntimeError("a roster with experts_per_token is open on this model: a roster cannot be open on a "
                           "model together with another roster that has experts_per_token; close it first")
    calls = probe(model, slots)
    family = type(model).__name__
    for slot in slots:
        if slot.layer not in calls:
            raise ValueError(f"{family}: router {slot.path} did not run in a forward; cannot self-test it")
        args, kwargs, output = calls[slot.layer]
        slot.rule = choose_rule(slot, output, family, args, kwargs)
        slot.experts = slot.rule.logits(slot.module, output).shape[-1]


# Buffers of MoE layers routed by a fixed table instead of a router: [vocab, k] expert ids per token.
HASH_TABLES = ("tid2eid",)


def dial(model: torch.nn.Module, slots: list[RouterSlot], k: int | None) -> None:
    """Make every router select ``k`` experts per token (None or the model's own k: no change).

    Raises ValueError when k exceeds a router's experts, the family's model fixes k, or a
    hash-routed layer (its k is the width of a table in the checkpoint) would keep the old k.
    """
    if k is None:
        return
    family = type(model).__name__
    for slot in slots:
        if k > slot.experts:
            raise ValueError(f"experts_per_token={k} exceeds the {slot.experts} experts of {family}'s router "
                             f"{slot.path}; choose 1 <= experts_per_token <= {slot.experts}")
        slot.dialled = k != slot.rule.model_k(slot.module)
        if slot.dialled and slot.rule.fixed_k is not None:
            raise ValueError(f"{family} cannot run experts_per_token={k}: {slot.rule.fixed_k}. "
                             f"Leave experts_per_token unset (or {slot.rule.model_k(slot.module)}) for this family.")
        if slot.dialled:
            slot.rule = slot.rule.with_k(k)
    tables = [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] in HASH_TABLES]
    if tables and any(slot.dialled for slot in slots):
        raise ValueError(f"{family} cannot run experts_per_token={k}: its hash-routed MoE layers ({tables[0]}, ...) "
                         "take their experts per token from a table in the checkpoint, which fixes k. "
                         "Leave experts_per_token unset for this family.")
