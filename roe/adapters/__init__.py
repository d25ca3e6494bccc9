"""Router discovery and adapter selection, from the model itself.

1. ``find_routers``: the router class is the one the model records ``router_logits`` from
   (``_can_record_outputs["router_logits"]``, searched through sub-models for multimodal
   wrappers); every instance of it is one MoE layer, in module order.
2. ``probe``: one short clean forward captures each router's real call and output.
3. ``choose_rule``: every registered rule variant that applies to the router is run on that
   captured output with zero noise; the first to reproduce it bit for bit is used. A router no
   rule reproduces is refused, naming the family and the rules tried.

No class-name list: a new transformers family that routes by a known rule works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from roe.adapters.base import Rule, self_test
from roe.adapters.sigmoid_groups import SigmoidGroups
from roe.adapters.softmax_topk import SoftmaxTopK
from roe.adapters.topk_softmax import TopKSoftmax

RULES: list[type[Rule]] = [SigmoidGroups, SoftmaxTopK, TopKSoftmax]


@dataclass
class RouterSlot:
    """One MoE layer's router: its module path, MoE ordinal, rule, and original forward."""

    path: str
    module: torch.nn.Module
    layer: int
    rule: Rule | None = None
    saved_forward: Any = None


def router_recorder(model: torch.nn.Module) -> tuple[type, int] | None:
    """(router class, index of the logits in its output) declared by the model or a sub-model."""
    for module in model.modules():
        recorder = getattr(type(module), "_can_record_outputs", None) or {}
        spec = recorder.get("router_logits") if isinstance(recorder, dict) else None
        if spec is None:
            continue
        target = getattr(spec, "target_class", None) or (spec if isinstance(spec, type) else None)
        if isinstance(target, type):
            return target, getattr(spec, "index", 0)
    return None


def find_routers(model: torch.nn.Module) -> list[RouterSlot]:
    """Every router of the model in module (= layer) order; raises if the model has none."""
    found = router_recorder(model)
    family = type(model).__name__
    if found is None:
        raise ValueError(
            f"{family} has no MoE layer: it declares no router_logits output. roe works on transformers "
            "Mixture-of-Experts causal LMs (OLMoE, Mixtral, Qwen-MoE, DeepSeek, GPT-OSS, ...); see `roe models`."
        )
    router_cls, _ = found
    slots = [RouterSlot(path=name, module=m, layer=i)
             for i, (name, m) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, router_cls))]
    if not slots:
        raise ValueError(f"{family} declares router class {router_cls.__name__} but contains no instance of it")
    return slots


@torch.no_grad()
def probe(model: torch.nn.Module, slots: list[RouterSlot], seq_len: int = 12) -> dict[int, Any]:
    """Run one clean forward on random tokens; return each router's output by MoE layer."""
    captured: dict[int, Any] = {}
    handles = [
        slot.module.register_forward_hook(lambda _m, _a, out, layer=slot.layer: captured.setdefault(layer, out))
        for slot in slots
    ]
    gen = torch.Generator().manual_seed(1234)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, seq_len), generator=gen).to(model.device)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def choose_rule(slot: RouterSlot, output: Any, family: str) -> Rule:
    """The first rule variant that reproduces this router exactly at tau = 0."""
    tried = []
    for rule_cls in RULES:
        for rule in rule_cls.candidates(slot.module):
            tried.append(rule.describe())
            if self_test(rule, slot.module, output):
                return rule
    raise ValueError(
        f"{family}: no roe routing rule reproduces router {type(slot.module).__name__} ({slot.path}) at tau = 0 "
        f"(tried: {', '.join(tried) or 'none applicable'}). Supported rules: "
        f"{', '.join(r.name for r in RULES)}. See `roe models`."
    )


def resolve_rules(model: torch.nn.Module, slots: list[RouterSlot]) -> None:
    """Probe and self-test every router; each slot gets its rule or an error is raised."""
    outputs = probe(model, slots)
    family = type(model).__name__
    for slot in slots:
        if slot.layer not in outputs:
            raise ValueError(f"{family}: router {slot.path} did not run in a forward; cannot self-test it")
        slot.rule = choose_rule(slot, outputs[slot.layer], family)
