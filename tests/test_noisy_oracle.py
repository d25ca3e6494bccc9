"""An oracle for tau > 0 that shares no code with roe's routing rules: the model's own router.

Shapes: T rows the router sees, W the width of its logits (experts, plus Zaya's skip class),
A experts per token.

The tau = 0 self-test and the slow reference (which shares the adapters) cannot catch a rule
that is wrong only at noisy indices, e.g. a missing renormalisation over experts the clean
router would not have chosen. Here, per router of every family roe supports (roe/families.py):

1. *noisy run*: the router's own ``forward`` on its real call (captured from a clean forward),
   with the roster's noise ``tau * G`` (``NoisePlan``, member 0 rows clean) added to the output
   of the op that produces its logits, so the router's own softmax / bias / group limit / top-k /
   renormalisation code selects on noisy logits. It returns the model's selection and its
   *noisy* weights.
2. *forced clean run*: the same forward on clean logits, with every selection op (``topk``,
   and ``max`` over a dim: PhiMoE's sequential picks, DeepSeek-V2's group scores) returning the
   indices the noisy run's same op returned, and the clean input's values at them. This is the
   model's own gating evaluated on clean logits at the noisy choice: what DESIGN §1 says the
   weights must be ("noise changes selection only"). Group limits are forced too, so a
   group-limited router keeps the groups the noisy selection kept.
3. roe's rule: ``reroute(router, clean output, noise)`` must equal the forced clean run (ids and
   weights, bit for bit), and with ``noisy_weights`` the noisy run.

The ops are intercepted with a ``TorchFunctionMode`` for the duration of one router call: most
v5 routers compute their logits with ``F.linear(h, self.weight)`` and have no gate sub-module
to hook (transformers-moe.md §1), so the mode adds the noise to the router's last ``F.linear``
output (its logits; Inkling: the routed columns of it) whether it comes from a module or a
functional call. Each family's run checks the injection reached the logits the router returns.

Plus hand-computed cases per rule (4 experts, top-2, logits and noise chosen so the weights are
simple fractions written out here), as vLLM tests its routers against a native reference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from roe import adapters, families
from roe.adapters.dense_sigmoid import DenseSigmoid
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
from roe.routing import NoisePlan

pytestmark = pytest.mark.usefixtures("one_thread")

# roe refuses these (tests/test_families.py); no rule to check.
ROE_REFUSED = {"dbrx"}
# Families whose router the oracle cannot drive, with the reason. Empty today: every supported
# family's logits come from an F.linear and its selection from topk / max. A new family that
# does not must be added here with its reason, or get its own oracle (test_hook_reaches_every_family).
UNHOOKABLE: dict[str, str] = {}
# ProbsTopK (Gemma4) returns probabilities, not logits: its noisy run is checked by selection and
# weights only, and roe's noisy-weights variant takes log p in float64 (ulp-level differences).
PROBS_RULES = {"probs-topk"}

TAU = 1.0
SUPPORTED = [n for n in families.FAMILIES if n not in ROE_REFUSED]


class RouterTap(TorchFunctionMode):
    """One router call: noise on its logits op, its selection ops recorded or forced.

    ``noise_TW``: added to the first W columns of the ``logits_call``-th ``F.linear`` output.
    ``forced``: indices per selection op, in call order; each op then returns them, with the
    values of its own (clean) input there.
    """

    def __init__(self, noise_TW: torch.Tensor | None = None, logits_call: int = 0,
                 forced: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.noise_TW, self.logits_call, self.forced = noise_TW, logits_call, forced
        self.linears = 0
        self.injected = False
        self.selections: list[torch.Tensor] = []
        self.signatures: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            self.linears += 1
            if self.noise_TW is not None and self.linears == self.logits_call:
                out, self.injected = self._add_noise(out), True
        elif is_selection(func, args, kwargs):
            self.signatures.append((func.__name__, tuple(args[0].shape)))
            if self.forced is not None:
                out = forced_result(out, args[0], self.forced[len(self.selections)])
            self.selections.append(out.indices)
        return out

    def _add_noise(self, out: torch.Tensor) -> torch.Tensor:
        T, W = self.noise_TW.shape
        flat_TX = out.reshape(T, -1)
        noisy_TX = torch.cat([flat_TX[:, :W] + self.noise_TW.to(out.dtype), flat_TX[:, W:]], dim=-1)
        return noisy_TX.reshape(out.shape)


def is_selection(func, args, kwargs) -> bool:
    """topk, or max / min over a dim (a pick returning values and indices)."""
    if func in (torch.topk, torch.Tensor.topk):
        return True
    with_dim = len(args) > 1 or "dim" in kwargs
    return func in (torch.max, torch.Tensor.max) and with_dim


def forced_result(out, input_X: torch.Tensor, idx: torch.Tensor):
    """``out`` (a topk/max result) with indices ``idx`` and the input's values at them."""
    gather_idx = idx if idx.dim() == input_X.dim() else idx.unsqueeze(-1)
    values = input_X.gather(-1, gather_idx)
    return type(out)((values if idx.dim() == input_X.dim() else values.squeeze(-1), idx))


def call(router, args, kwargs, tap: RouterTap):
    with torch.no_grad(), tap:
        return router(*args, **kwargs)


def assert_same(got, want, atol: float = 0.0, where: str = "") -> None:
    """Router outputs equal: integer parts exactly, float parts within atol (0: bit for bit)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype, where
        if want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(got, want), f"{where}: {got} != {want}"
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, atol, f"{where}[{i}]")
    else:
        assert got == want, where


def oracle_runs(router, rule, args, kwargs, noise_TW):
    """(clean output, noisy run, forced clean run, noisy tap) of the router's own code."""
    clean_tap = RouterTap()
    clean = call(router, args, kwargs, clean_tap)
    noisy_tap = RouterTap(noise_TW, logits_call=clean_tap.linears)
    noisy = call(router, args, kwargs, noisy_tap)
    assert noisy_tap.injected and noisy_tap.selections, "no logits op or no selection op in the router"
    forced_tap = RouterTap(forced=noisy_tap.selections)
    forced = call(router, args, kwargs, forced_tap)
    assert forced_tap.signatures == noisy_tap.signatures == clean_tap.signatures
    return clean, noisy, forced, noisy_tap


def family_noise(slot, logits_TW: torch.Tensor, seed: int) -> torch.Tensor:
    """The roster's noise for these rows: members 0, 1, 2 in turn (member 0 clean), tau = TAU."""
    T = logits_TW.shape[0]
    plan = NoisePlan.for_rows(seed=seed, member_T=torch.arange(T) % 3, position_T=torch.arange(T) // 3,
                              tau_L=(TAU,) * (slot.layer + 1))
    return plan.noise(slot.layer, logits_TW)


def check_router(name, slot, args, kwargs, seed: int) -> tuple[int, int]:
    """Oracle vs rule on one router; returns (rows whose selection the noise changed, rows)."""
    router, rule = slot.module, slot.rule
    clean_out = call(router, args, kwargs, RouterTap())
    logits_TW = rule.logits(router, clean_out)
    noise_TW = family_noise(slot, logits_TW, seed)
    clean, noisy, forced, noisy_tap = oracle_runs(router, rule, args, kwargs, noise_TW)
    where = f"{name} {slot.path} ({rule.describe()})"
    if rule.name not in PROBS_RULES:  # the injection reached the logits the router returns
        assert torch.equal(rule.logits(router, noisy), logits_TW + noise_TW), where
    assert_same(rule.reroute(router, clean, noise_TW, False, args, kwargs), forced, where=f"{where} clean weights")
    atol = 1e-6 if rule.name in PROBS_RULES else 0.0
    roe_noisy = rule.reroute(router, clean, noise_TW, True, args, kwargs)
    assert_same(without_logits(rule, roe_noisy), without_logits(rule, noisy), atol, f"{where} noisy weights")
    # not vacuous: the noise moved selections, and clean and noisy weights differ there
    clean_tap = RouterTap()
    call(router, args, kwargs, clean_tap)
    moved_T = (clean_tap.selections[-1].sort(-1).values != noisy_tap.selections[-1].sort(-1).values)
    moved_T = moved_T.reshape(len(logits_TW), -1).any(-1)
    assert not torch.equal(_floats(forced), _floats(noisy)), f"{where}: clean and noisy weights never differ"
    return int(moved_T.sum()), len(moved_T)


def without_logits(rule, output) -> list:
    """The output without its logits element (roe passes the clean logits through; the noisy run returns noisy ones)."""
    return [part for i, part in enumerate(output) if i != rule.logits_index]


def _floats(output) -> torch.Tensor:
    parts = output if isinstance(output, (tuple, list)) else [output]
    return torch.cat([p.flatten() for p in parts if isinstance(p, torch.Tensor) and p.is_floating_point()])


@pytest.mark.parametrize("name", SUPPORTED)
def test_rule_matches_the_models_own_router_at_noisy_indices(name):
    model = families.build(name)
    slots = adapters.find_routers(model)
    adapters.resolve_rules(model, slots)
    calls = adapters.probe(model, slots)
    if name in UNHOOKABLE:
        with pytest.raises(AssertionError, match="no logits op or no selection op"):
            check_router(name, slots[0], *calls[slots[0].layer][:2], seed=0)
        return
    moved = rows = 0
    for slot in slots:
        args, kwargs, _ = calls[slot.layer]
        m, r = check_router(name, slot, args, kwargs, seed=slot.layer)
        moved, rows = moved + m, rows + r
    # two thirds of the rows are noisy at tau = 1: the noise must move some of their selections
    assert moved >= rows // 6, f"{name}: tau = {TAU} moved the selection of only {moved}/{rows} rows"


def test_refused_and_unhookable_families_are_the_expected_ones():
    """roe refuses exactly ROE_REFUSED; a new family needing an exception shows up here."""
    assert set(UNHOOKABLE) <= set(SUPPORTED)
    assert ROE_REFUSED <= set(families.FAMILIES)
    for name in ROE_REFUSED:
        model = families.build(name)
        slots = adapters.find_routers(model)
        with pytest.raises(ValueError, match="returns only its logits"):
            adapters.resolve_rules(model, slots)
    assert UNHOOKABLE == {}
