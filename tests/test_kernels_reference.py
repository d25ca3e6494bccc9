"""The decode kernels against F.linear on every code path, and what happens when they fail.

Tolerance: a kernel sums the H products of a row in another order than F.linear (oneDNN's
blocking, the AVX2 lanes). For any order, |fl(x . w) - x . w| <= gamma_H |x| . |w| with
gamma_H = H u / (1 - H u) and u = 2^-24 (Higham, Accuracy and Stability, 3.1), so two orders
differ by at most 2 gamma_H |x| . |w| per output (one more rounding for a bias). ``assert_bounded``
checks that elementwise bound, not a tolerance tuned to pass.

Failures: a private torch op missing or wrong when the kernel is chosen means no kernel, an
exception while decoding means F.linear from then on; both say so with a RuntimeWarning, and a
decode step's result is then F.linear's exactly.
"""


import pytest
import torch
import torch.nn.functional as F

import roe
from roe import reference
from roe.kernels import MAX_ROWS, PackedHead, SmallM
from tests.conftest import small_m_or_skip, tiny_olmoe

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")

NOISY = roe.RoEConfig(roster_size=4, tau=1.5, skip_first=0, skip_last=0, seed=3)
U = 2.0 ** -24  # fp32 unit roundoff


@pytest.fixture
def decode_kernels_off():
    """Overrides tests/conftest.py's autouse fixture: this module tests the kernels, so they stay on."""


def assert_bounded(got, x, weight, bias=None):
    """``got`` equals F.linear(x, weight, bias) within the summation-order bound (module docstring)."""
    want = F.linear(x, weight, bias)
    terms = x.shape[-1] + (bias is not None)
    gamma = terms * U / (1 - terms * U)
    bound = 2 * gamma * (F.linear(x.abs(), weight.abs(), None if bias is None else bias.abs()))
    assert got.shape == want.shape and got.dtype == want.dtype
    excess = (got - want).abs() - bound
    assert excess.max() <= 0, f"off by {excess.max():.3g} beyond the bound"


def linear(in_features, out_features, bias, seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=bias)


class Model(torch.nn.Module):
    """The least a kernel's ``for_model`` reads: an output embedding and modules."""

    def __init__(self, head, *inner):
        super().__init__()
        self.head, self.inner = head, torch.nn.ModuleList(inner)

    def get_output_embeddings(self):
        return self.head


# --- the packed head against F.linear


@pytest.mark.parametrize("rows", [*range(1, MAX_ROWS + 1), 9, 33])
@pytest.mark.parametrize("in_features,bias", [(32, False), (48, True), (256, False), (100, True)])
def test_packed_head_equals_f_linear(rows, in_features, bias):
    """Every row count of a decode step and beyond, widths that are and are not multiples of 32
    (oneDNN takes any), with and without a bias; leading axes are kept."""
    head = linear(in_features, 300, bias, seed=rows)
    packed = PackedHead.for_model(Model(head))
    assert packed is not None
    x = torch.randn(rows, 1, in_features, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        assert_bounded(packed.product(x), x, head.weight, head.bias)


def test_the_bound_is_tight_enough_to_fail():
    """A product off by 0.1% breaks the bound (a wrong packing or lane would be far worse)."""
    head = linear(256, 300, False, seed=0)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="beyond the bound"):
        assert_bounded(F.linear(x, head.weight) * (1 + 1e-3), x, head.weight)


# --- the small-M kernel against F.linear


@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("in_features", [32, 64, 96, 256])
def test_small_m_equals_f_linear(rows, in_features):
    """Every block of rows the kernel unrolls (8, 4, 2, 1 and their sums) at widths of 1 to 8 AVX2
    steps."""
    extension = small_m_or_skip()
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, in_features, generator=gen), torch.randn(40, in_features, generator=gen)
    assert_bounded(extension.small_m_linear(x, w), x, w)


@pytest.mark.parametrize("rows,in_features", [(2, 48), (2, 16), (0, 64), (MAX_ROWS + 1, 64)])
def test_the_extension_refuses_what_it_does_not_compute(rows, in_features):
    extension = small_m_or_skip()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        extension.small_m_linear(torch.randn(rows, in_features), torch.randn(4, in_features))


@pytest.mark.parametrize("case", ["width 48", "bias", "9 rows", "float64", "non-contiguous weight"])
def test_small_m_keeps_f_linear_where_it_does_not_apply(case):
    """Products the kernel does not compute are F.linear's exactly, even for a linear it was given."""
    small_m_or_skip()
    layer = linear(48 if case == "width 48" else 64, 24, case == "bias", seed=0)
    rows = MAX_ROWS + 1 if case == "9 rows" else 3
    if case == "float64":
        layer.double()
    if case == "non-contiguous weight":
        layer.weight = torch.nn.Parameter(torch.randn(64, 24).t())
    calls = []
    kernel = SmallM([layer], lambda x, w: calls.append(x.shape) or F.linear(x, w) + 1.0)
    x = torch.randn(rows, layer.in_features, dtype=layer.weight.dtype)
    with torch.no_grad(), kernel.installed():
        got = layer(x)
    assert torch.equal(got, F.linear(x, layer.weight, layer.bias)) and calls == []


def test_small_m_for_model_takes_only_the_linears_it_computes():
    small_m_or_skip()
    head, wide, narrow, biased = linear(64, 10, False, 0), linear(64, 8, False, 1), linear(48, 8, False, 2), \
        linear(64, 8, True, 3)
    kernel = SmallM.for_model(Model(head, wide, narrow, biased))
    assert kernel is not None and kernel.linears == [wide]


# --- failures of the private torch ops and of the kernel


def test_a_missing_op_means_no_packed_head_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.ops, "mkldnn", object())  # an op missing from this torch build
    with pytest.warns(RuntimeWarning, match="packed LM head is unavailable"):
        assert PackedHead.for_model(tiny_olmoe()) is None


@pytest.mark.parametrize("rows", [1, 5, MAX_ROWS])
def test_a_wrong_op_on_any_row_count_means_no_packed_head(monkeypatch, rows):
    """The check runs every row count of a decode step: an op wrong for one of them is caught."""
    pointwise = torch.ops.mkldnn._linear_pointwise

    def wrong(x, *args):
        out = pointwise(x, *args)
        return out * 1.001 if x.shape[0] == rows else out

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", wrong)
    with pytest.warns(RuntimeWarning, match="disagrees with F.linear"):
        assert PackedHead.for_model(tiny_olmoe()) is None


def test_an_op_failing_while_decoding_falls_back_to_f_linear(monkeypatch, prompt_ids):
    with roe.roster(tiny_olmoe(), NOISY) as r:
        r.generate(prompt_ids, max_new_tokens=1)  # the head is packed and checked
        head = r._head
        assert isinstance(head, PackedHead) and not head.broken

        def boom(*args):
            raise RuntimeError("oneDNN: could not create a primitive")

        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", boom)
        with pytest.warns(RuntimeWarning, match="packed LM head failed .*could not create a primitive"):
            fast = r.generate(prompt_ids, max_new_tokens=5)[0]
        slow = reference.generate_greedy(r, prompt_ids[0], 5)
        assert head.broken
        x = torch.randn(3, head.linear.in_features)
        with torch.no_grad():
            assert torch.equal(head.product(x), F.linear(x, head.linear.weight, head.linear.bias))
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("change", ["in place", "load_state_dict", "new Parameter", ".data", "to float64"])
def test_a_changed_head_weight_is_never_read_stale(change):
    """The packed copy follows the weight: packed again when changed in place or replaced (a new
    Parameter at the same in-place version, or new ``.data``, used to keep the stale copy), F.linear
    when no longer fp32."""
    model = tiny_olmoe()
    head = model.get_output_embeddings()
    packed = PackedHead.for_model(model)
    x = torch.randn(2, 8, head.in_features, generator=torch.Generator().manual_seed(1))
    new = torch.randn_like(head.weight)
    with torch.no_grad():
        packed.product(x)
        if change == "in place":
            head.weight.mul_(-2.0)
        elif change == "load_state_dict":
            head.load_state_dict({"weight": new})
        elif change == "new Parameter":  # at the old one's in-place version, as after as many initialisations
            replacement = torch.nn.Parameter(new)
            while replacement._version < head.weight._version:
                replacement.add_(0.0)
            head.weight = replacement
        elif change == ".data":
            head.weight.data = new
        else:
            head.double()
            x = x.double()
        if change == "to float64":
            with pytest.warns(RuntimeWarning, match="no longer fp32"):
                assert torch.equal(packed.product(x), F.linear(x, head.weight))
        else:
            assert_bounded(packed.product(x), x, head.weight)
            assert not packed.broken


def test_small_m_failing_while_decoding_falls_back_to_f_linear(prompt_ids):
    small_m_or_skip()
    with roe.roster(tiny_olmoe(), NOISY) as r:
        r.generate(prompt_ids, max_new_tokens=1)
        kernel = r._small_m
        assert isinstance(kernel, SmallM)

        def boom(x, w):
            raise RuntimeError("K a multiple of 32, 1 <= M <= 8")

        kernel._product = boom
        with pytest.warns(RuntimeWarning, match="decode kernel failed"):
            fast = r.generate(prompt_ids, max_new_tokens=5)[0]
        assert kernel._product is None
        slow = reference.generate_greedy(r, prompt_ids[0], 5)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("failure", ["wrong", "raises"])
def test_a_kernel_wrong_or_failing_in_its_check_is_not_used(monkeypatch, failure):
    class Wrong:
        @staticmethod
        def small_m_linear(x, w):
            if failure == "raises":
                raise RuntimeError("illegal instruction")
            return F.linear(x, w) * 1.001

    monkeypatch.setattr(SmallM, "_extension", Wrong)
    with pytest.warns(RuntimeWarning, match="decode kernel (disagrees|failed its check)"):
        assert SmallM.for_model(tiny_olmoe()) is None
