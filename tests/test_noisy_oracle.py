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
   model's own gating evaluated on clean logits at the noisy choice: what roe/adapters/base.py says the
   weights must be ("noise changes selection only"). Group limits are forced too, so a
   group-limited router keeps the groups the noisy selection kept.
3. roe's rule: ``reroute(router, clean output, noise)`` must equal the forced clean run (ids and
   weights, bit for bit), and with ``noisy_weights`` the noisy run.

The ops are intercepted with a ``TorchFunctionMode`` for the duration of one router call: most
v5 routers compute their logits with ``F.linear(h, self.weight)`` and have no gate sub-module
to hook (transformers-moe.md §1), so the mode adds the noise to the router's last ``F.linear``
output (its logits; Inkling: the routed columns of it) whether it comes from a module or a
functional call. Each family's run checks the injection reached the logits the router returns.
Every supported family is checked this way, on its own code: none needed its router's formula
rewritten in the test.

Plus hand-computed cases per rule (4 experts, top-2, logits and noise chosen so the weights are
simple fractions written out here), as vLLM tests its routers against a native reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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

# roe refuses these (tests/test_families.py), with the reason; no rule to check. Doge's product-key
# router mixes tokens (roe/adapters/locality.py): the oracle's premise, one router call selecting per
# row, does not hold for it, and neither does any rule's.
ROE_REFUSED = {"dbrx": "returns only its logits", "doge": "routes each token by the other tokens"}
# Families whose router the oracle cannot drive, with the reason. Empty today: every supported
# family's logits come from an F.linear and its selection from topk / max. A new family that does
# not fails its case below ("no logits op or no selection op") until it is listed here with its
# reason (or gets its own oracle); a listed family that becomes hookable fails too.
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
    """topk, or max over a dim (a pick returning values and indices; not the elementwise max)."""
    if func in (torch.topk, torch.Tensor.topk):
        return True
    with_dim = (len(args) > 1 and isinstance(args[1], int)) or "dim" in kwargs
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


@dataclass
class OracleRuns:
    """The router's own code on one call: clean, on noisy logits, and clean with the noisy picks forced."""

    clean: Any
    noisy: Any
    forced: Any
    clean_picks: list[torch.Tensor]
    noisy_picks: list[torch.Tensor]


def oracle_runs(router, args, kwargs, noise_TW: torch.Tensor) -> OracleRuns:
    clean_tap = RouterTap()
    clean = call(router, args, kwargs, clean_tap)
    noisy_tap = RouterTap(noise_TW, logits_call=clean_tap.linears)
    noisy = call(router, args, kwargs, noisy_tap)
    assert noisy_tap.injected and noisy_tap.selections, "no logits op or no selection op in the router"
    forced_tap = RouterTap(forced=noisy_tap.selections)
    forced = call(router, args, kwargs, forced_tap)
    assert forced_tap.signatures == noisy_tap.signatures == clean_tap.signatures
    return OracleRuns(clean, noisy, forced, clean_tap.selections, noisy_tap.selections)


def family_noise(slot, logits_TW: torch.Tensor, seed: int) -> torch.Tensor:
    """The roster's noise for these rows: members 0, 1, 2 in turn (member 0 clean), tau = TAU."""
    T = logits_TW.shape[0]
    plan = NoisePlan.for_rows(seed=seed, member_T=torch.arange(T) % 3, position_T=torch.arange(T) // 3,
                              tau_L=(TAU,) * (slot.layer + 1))
    return plan.noise(slot.layer, logits_TW)


def check_router(name, slot, args, kwargs, seed: int) -> tuple[int, int]:
    """Oracle vs rule on one router; returns (rows whose selection the noise moved, rows)."""
    router, rule = slot.module, slot.rule
    logits_TW = rule.logits(router, call(router, args, kwargs, RouterTap()))
    noise_TW = family_noise(slot, logits_TW, seed)
    runs = oracle_runs(router, args, kwargs, noise_TW)
    where = f"{name} {slot.path} ({rule.describe()})"
    if rule.name not in PROBS_RULES:  # the injection reached the logits the router returns
        assert torch.equal(rule.logits(router, runs.noisy), logits_TW + noise_TW), where
    roe_clean = rule.reroute(router, runs.clean, noise_TW, False, args, kwargs)
    assert_same(roe_clean, runs.forced, where=f"{where} clean weights")
    roe_noisy = rule.reroute(router, runs.clean, noise_TW, True, args, kwargs)
    atol = 1e-6 if rule.name in PROBS_RULES else 0.0
    assert_same(without_logits(rule, roe_noisy), without_logits(rule, runs.noisy), atol, f"{where} noisy weights")
    # not vacuous: clean and noisy weights differ (so the two checks above are different claims)
    assert not torch.equal(gates(rule, runs.forced), gates(rule, runs.noisy)), f"{where}: weights never differ"
    moved_T = runs.clean_picks[-1].sort(-1).values != runs.noisy_picks[-1].sort(-1).values
    moved_T = moved_T.reshape(len(logits_TW), -1).any(-1)
    return int(moved_T.sum()), len(moved_T)


def without_logits(rule, output) -> list:
    """The output without its logits (roe passes the clean ones through; the noisy run returns noisy ones)."""
    return [part for i, part in enumerate(output) if i != rule.logits_index]


def gates(rule, output) -> torch.Tensor:
    """Every float of the output but the logits, flattened."""
    parts = [p for p in without_logits(rule, output) if isinstance(p, torch.Tensor) and p.is_floating_point()]
    return torch.cat([p.flatten() for p in parts])


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


def test_the_families_left_out_are_refused_by_roe():
    """The oracle skips only families roe itself refuses (every other one passes resolve_rules above)."""
    for name, reason in ROE_REFUSED.items():
        model = families.build(name)
        slots = adapters.find_routers(model)
        with pytest.raises(ValueError, match=reason):
            adapters.resolve_rules(model, slots)


# ----------------------------------------------------------------------------------------------------
# Hand-computed cases: 4 experts, row 0 clean (zero noise), row 1 noisy. Logits are logs (softmax
# routers) or logits of round scores (sigmoid routers), so every weight is a fraction written out.

LOG_P = [math.log(p) for p in (0.1, 0.2, 0.3, 0.4)]  # softmax -> p = 0.1, 0.2, 0.3, 0.4
LOGIT_S = [math.log(s / (1 - s)) for s in (0.2, 0.5, 0.6, 0.8)]  # sigmoid -> s = 0.2, 0.5, 0.6, 0.8


class HandRouter(torch.nn.Module):
    """A router holding only the attributes a rule reads; tensors become buffers (as in the models)."""

    def __init__(self, **attrs) -> None:
        super().__init__()
        for key, value in attrs.items():
            if isinstance(value, torch.Tensor):
                self.register_buffer(key, value)
            else:
                setattr(self, key, value)

    def forward(self, hidden_states):  # the signature rules bind the call's arguments against
        raise NotImplementedError


def rows(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def reroute(rule, router, logits_TE, noise_E, rest=()):
    """roe's rule on a 3-tuple router output (plus ``rest``); row 0 clean, row 1 gets ``noise_E``."""
    T, A = len(logits_TE), rule.k(router)
    output = (logits_TE, torch.zeros(T, A), torch.zeros(T, A, dtype=torch.long), *rest)
    noise_TE = torch.stack([torch.zeros(len(noise_E)), rows(*noise_E)])
    return rule.reroute(router, output, noise_TE, False, (logits_TE,), {})


def assert_routed(got, idx, weights) -> None:
    assert got[2].tolist() == idx
    torch.testing.assert_close(got[1], rows(*weights), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("renormalise", "weights"), [
    (False, [[0.4, 0.3], [0.1, 0.4]]),
    (True, [[4 / 7, 3 / 7], [0.1 / 0.5, 0.4 / 0.5]]),
])
def test_hand_softmax_topk(renormalise, weights):
    """Noise 3 on expert 0 picks {0, 3}; weights are the clean p there (renormalised over the two)."""
    got = reroute(SoftmaxTopK(renormalise), HandRouter(top_k=2), rows(LOG_P, LOG_P), [3, 0, 0, 0])
    assert_routed(got, [[3, 2], [0, 3]], weights)


def test_hand_topk_softmax():
    """Softmax over the clean logits of the picked experts: e^l3 : e^l2 = 4 : 3, e^l0 : e^l3 = 1 : 4."""
    got = reroute(TopKSoftmax(), HandRouter(top_k=2), rows(LOG_P, LOG_P), [3, 0, 0, 0])
    assert_routed(got, [[3, 2], [0, 3]], [[4 / 7, 3 / 7], [1 / 5, 4 / 5]])


def test_hand_sorted_dispatch():
    """JetMoe's dispatch tuple: row 0 picks (3, 2), row 1 (noise 4 and 3 on experts 0 and 1) picks (0, 1)."""
    logits_TE = rows(LOG_P, LOG_P)
    output = (None, None, torch.zeros(4), None, logits_TE)
    noise_TE = rows([0, 0, 0, 0], [4, 3, 0, 0])
    order, batch_index, gates, sizes, logits = SortedDispatch().reroute(HandRouter(top_k=2), output, noise_TE, False)
    # flat picks (3, 2, 0, 1) with gates (4/7, 3/7, 1/3, 2/3), sorted by expert
    assert order.tolist() == [2, 3, 1, 0] and batch_index.tolist() == [1, 1, 0, 0] and sizes == [1, 1, 1, 1]
    torch.testing.assert_close(gates, rows(1 / 3, 2 / 3, 3 / 7, 4 / 7), rtol=0, atol=1e-6)
    assert logits is logits_TE


def test_hand_dense_sigmoid():
    """Llama4: the dense gate holds sigmoid(clean logit) = s at the picked experts, 0 elsewhere."""
    logits_TE = rows(LOGIT_S, LOGIT_S)
    output = (torch.zeros(2, 4), logits_TE)
    noise_TE = rows([0, 0, 0, 0], [3, 0, 0, 0])  # expert 0: -1.39 + 3 = 1.61 beats 0.41 and 1.39
    dense_TE, logits = DenseSigmoid().reroute(HandRouter(top_k=2), output, noise_TE, False)
    torch.testing.assert_close(dense_TE, rows([0, 0, 0.6, 0.8], [0.2, 0, 0, 0.8]), rtol=0, atol=1e-6)
    assert logits is logits_TE


def test_hand_probs_topk():
    """Gemma4: the router returns p; noise on log p; p renormalised over the picks x per-expert scale."""
    router = HandRouter(per_expert_scale=rows(1, 2, 3, 4), config=HandRouter(top_k_experts=2))
    probs_TE = rows([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    got = reroute(ProbsTopK(), router, probs_TE, [3, 0, 0, 0])
    assert_routed(got, [[3, 2], [0, 3]], [[4 / 7 * 4, 3 / 7 * 3], [0.2 * 1, 0.8 * 4]])


def test_hand_sigmoid_bias():
    """Bias 0.5 on expert 2 (choice only); noise on the logit of expert 0: sigmoid(1.61) = 0.83 > 0.8."""
    router = HandRouter(top_k=2, e_score_correction_bias=rows(0, 0, 0.5, 0), routed_scaling_factor=2.5)
    rule = SigmoidBias(renorm_eps=0.0, scale="routed_scaling_factor")
    got = reroute(rule, router, rows(LOGIT_S, LOGIT_S), [3, 0, 0, 0])
    assert_routed(got, [[2, 3], [2, 0]], [[0.6 / 1.4 * 2.5, 0.8 / 1.4 * 2.5], [0.6 / 0.8 * 2.5, 0.2 / 0.8 * 2.5]])


def test_hand_logit_bias():
    """Kolibri1: bias 1.5 added to the logit of expert 2; weights sigmoid of the clean logits, no renorm."""
    router = HandRouter(top_k=2, e_score_correction_bias=rows(0, 0, 1.5, 0))
    rule = LogitBias(renorm_eps=None)
    got = reroute(rule, router, rows(LOGIT_S, LOGIT_S), [3, 0, 0, 0])  # choice 1.61, 0, 1.91, 1.39
    assert_routed(got, [[2, 3], [2, 0]], [[0.6, 0.8], [0.6, 0.2]])


def test_hand_sigmoid_groups():
    """Groups {0, 1} and {2, 3}, one kept. Clean: 0.6 + 0.8 wins; noise 3 on experts 0 and 1 makes
    0.83 + 0.95 win, and the weights are the clean s of that group, renormalised."""
    router = HandRouter(top_k=2, num_group=2, topk_group=1, e_score_correction_bias=rows(0, 0, 0, 0),
                        routed_scaling_factor=1.0)
    rule = SigmoidGroups(renorm_eps=0.0, scale="routed_scaling_factor")
    got = reroute(rule, router, rows(LOGIT_S, LOGIT_S), [3, 3, 0, 0])
    assert_routed(got, [[3, 2], [1, 0]], [[0.8 / 1.4, 0.6 / 1.4], [0.5 / 0.7, 0.2 / 0.7]])


def test_hand_softmax_groups():
    """DeepSeek-V2 group_limited_greedy (group score = its max p), no renorm, scale 1.5. Noise 3 on
    expert 0: p' = e^3 / (e^3 + 9) = 0.69 puts group {0, 1} first; weights are the clean p x 1.5."""
    router = HandRouter(top_k=2, num_group=2, topk_group=1, topk_method="group_limited_greedy",
                        routed_scaling_factor=1.5)
    rule = SoftmaxGroups(renorm_eps=None, scale="routed_scaling_factor", group_max=True)
    got = reroute(rule, router, rows(LOG_P, LOG_P), [3, 0, 0, 0])
    assert_routed(got, [[3, 2], [0, 1]], [[0.4 * 1.5, 0.3 * 1.5], [0.1 * 1.5, 0.2 * 1.5]])


def test_hand_softmax_bias():
    """Ernie: bias 0.25 on expert 0 (choice 0.35); noise 3 on expert 1 (p' = 0.83); clean p renormalised."""
    router = HandRouter(top_k=2, e_score_correction_bias=rows(0.25, 0, 0, 0), norm_min=1e-12)
    rule = SoftmaxBias(renorm_eps=0.0)
    got = reroute(rule, router, rows(LOG_P, LOG_P), [0, 3, 0, 0])
    assert_routed(got, [[3, 0], [1, 0]], [[0.8, 0.2], [2 / 3, 1 / 3]])


def test_hand_skip_expert():
    """Zaya: 4 experts + a skip class, top-1. p = (.05, .1, .15, .2, .5): the clean row skips (index 0,
    weight 0); noise 3 on expert 3 picks it with its clean p = 0.2."""
    router = HandRouter(top_k=1, num_experts=4, balancing_biases=rows(0, 0, 0, 0, 0))
    log_p = [math.log(p) for p in (0.05, 0.1, 0.15, 0.2, 0.5)]
    got = reroute(SkipExpert(renorm_eps=None), router, rows(log_p, log_p), [0, 0, 0, 3, 0], rest=("state",))
    assert_routed(got, [[0], [3]], [[0.0], [0.2]])
    assert got[3] == "state"


def test_hand_shared_gammas():
    """Inkling: s of the picks and of the shared expert (logit 0: s = 0.5) normalised together, x 2."""
    router = HandRouter(top_k=2, n_shared_experts=1, hidden_dim=5, weight=torch.eye(5), route_scale=1.0,
                        global_scale=rows(2.0), e_score_correction_bias=rows(0, 0, 0, 0))
    hidden_TX = rows([*LOGIT_S, 0.0], [*LOGIT_S, 0.0])  # the identity weight makes these the logits
    logits_TE = hidden_TX[:, :4]
    output = (logits_TE, torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 1))
    noise_TE = rows([0, 0, 0, 0], [3, 0, 0, 0])
    got = SharedGammas(sorted=True).reroute(router, output, noise_TE, False, (hidden_TX,), {})
    assert_routed(got, [[3, 2], [0, 3]], [[0.8 / 1.9 * 2, 0.6 / 1.9 * 2], [0.2 / 1.5 * 2, 0.8 / 1.5 * 2]])
    torch.testing.assert_close(got[3], rows([0.5 / 1.9 * 2], [0.5 / 1.5 * 2]), rtol=0, atol=1e-6)


def test_hand_sparsemixer():
    """PhiMoE, eps 0.01 (band 0.02). Clean: picks 0 (1.0) then 1 (0.99); 1 is in 0's band, so
    w = (e^1 / (e^1 + e^0.99), 1). Noise 3 on expert 2 picks 2 (0.5) then 0: the band of a pick keeps
    the experts above it, so w = (e^.5 / (e^1 + e^.99 + e^.5), e^1 / (e^1 + e^.99))."""
    e = math.exp
    router = HandRouter(top_k=2, router_jitter_noise=0.01)
    logits = [1.0, 0.99, 0.5, -1.0]
    got = reroute(SparseMixer(), router, rows(logits, logits), [0, 0, 3, 0])
    assert_routed(got, [[0, 1], [2, 0]], [[e(1) / (e(1) + e(0.99)), 1.0],
                                          [e(0.5) / (e(1) + e(0.99) + e(0.5)), e(1) / (e(1) + e(0.99))]])


def test_every_rule_has_a_hand_case():
    """A rule added to roe/adapters needs its hand-computed case here."""
    covered = {SoftmaxTopK, TopKSoftmax, SortedDispatch, DenseSigmoid, ProbsTopK, SigmoidBias, LogitBias,
               SigmoidGroups, SoftmaxGroups, SoftmaxBias, SkipExpert, SharedGammas, SparseMixer}
    assert set(adapters.RULES) == covered
