"""The faster products of decode steps (packed LM head, small-M kernel): as the model's, only inside a step."""

import shutil

import pytest
import torch

import roe
from roe import reference
from roe.kernels import PackedHead, SmallM
from tests.conftest import tiny_olmoe

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def test_packed_product_equals_the_head_and_follows_in_place_changes():
    model = tiny_olmoe()
    head = model.get_output_embeddings()
    packed = PackedHead.for_model(model)
    assert packed is not None
    x = torch.randn(2, 8, head.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(packed.product(x), head(x), rtol=0, atol=1e-5)
        head.weight.mul_(-2.0)  # e.g. a user loading other weights into the same module
        torch.testing.assert_close(packed.product(x), head(x), rtol=0, atol=1e-5)


def test_installed_only_inside_the_block():
    model = tiny_olmoe()
    head = model.get_output_embeddings()
    packed = PackedHead.for_model(model)
    with packed.installed():
        assert head.forward == packed.product
    assert "forward" not in head.__dict__
    with pytest.raises(RuntimeError, match="boom"), packed.installed():
        raise RuntimeError("boom")
    assert "forward" not in head.__dict__


def test_not_used_where_it_does_not_apply():
    assert PackedHead.for_model(tiny_olmoe().to(torch.float64)) is None
    model = tiny_olmoe()
    model.lm_head = torch.nn.Sequential(model.lm_head)  # not a plain nn.Linear
    assert PackedHead.for_model(model) is None


def test_decode_uses_it_for_k_above_1_and_still_matches_the_reference(olmoe, prompt_ids):
    calls = []
    with roe.roster(olmoe, roe.RoEConfig(roster_size=4, tau=1.5, skip_first=0, skip_last=0, seed=3)) as r:
        r.generate(prompt_ids, max_new_tokens=1)
        assert isinstance(r._head, PackedHead)
        original = r._head.product
        r._head.product = lambda x: calls.append(x.shape) or original(x)
        fast = r.generate(prompt_ids, max_new_tokens=6)[0]
        slow = reference.generate_greedy(r, prompt_ids[0], 6)
    assert torch.equal(fast, slow)
    assert len(calls) == 6 and all(shape[:-1].numel() == 4 for shape in calls)
    with roe.roster(olmoe, roe.RoEConfig(roster_size=1, tau=1.5)) as r:
        r.generate(prompt_ids, max_new_tokens=2)
        assert r._head is None  # one member: the untouched model, bit for bit


def test_not_installed_while_autograd_is_on(olmoe, prompt_ids):
    """A decode step with grad enabled (a caller outside no_grad) keeps the model's own head."""
    with roe.roster(olmoe, roe.RoEConfig(roster_size=4, tau=1.5, seed=3)) as r:
        head = olmoe.get_output_embeddings()
        assert isinstance(r._head, PackedHead)
        with torch.enable_grad(), r.decode_kernels():
            assert "forward" not in head.__dict__
        with torch.no_grad(), r.decode_kernels():
            assert head.forward == r._head.product


def _small_m_or_skip():
    from torch.utils.cpp_extension import is_ninja_available

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the small-M kernel needs AVX2")
    if shutil.which("c++") is None or not is_ninja_available():
        pytest.skip("the small-M kernel is compiled on first use: needs a C++ compiler and ninja")
    extension = SmallM.extension()
    assert extension is not None, "AVX2 is present but the small-M kernel did not build (see stderr)"
    return extension


@pytest.mark.parametrize("rows", range(1, SmallM.MAX_ROWS + 1))
def test_small_m_product_equals_f_linear(rows):
    extension = _small_m_or_skip()
    gen = torch.Generator().manual_seed(rows)
    for out_features, in_features in ((40, 64), (7, 256)):
        x, w = torch.randn(rows, in_features, generator=gen), torch.randn(out_features, in_features, generator=gen)
        torch.testing.assert_close(extension.small_m_linear(x, w), torch.nn.functional.linear(x, w),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        extension.small_m_linear(torch.randn(2, 48), torch.randn(4, 48))


def test_small_m_covers_the_decoder_linears_only_inside_the_block():
    _small_m_or_skip()
    model = tiny_olmoe()
    kernel = SmallM.for_model(model)
    assert kernel is not None
    head = model.get_output_embeddings()
    assert head not in kernel.linears
    assert {id(m) for m in kernel.linears} == {id(m) for m in model.modules()
                                               if type(m) is torch.nn.Linear and m is not head}
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        want = [m(x) for m in kernel.linears]
        with kernel.installed():
            got = [m(x[0]) for m in kernel.linears], [m(x) for m in kernel.linears]  # 5 rows, 15 rows
    for a, b, c in zip(want, *got):
        torch.testing.assert_close(a[0], b, rtol=1e-5, atol=1e-5)  # through the kernel
        torch.testing.assert_close(a, c)  # more rows than MAX_ROWS: F.linear
    assert all("forward" not in m.__dict__ for m in kernel.linears)
    with pytest.raises(RuntimeError, match="boom"), kernel.installed():
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in kernel.linears)


def test_decode_uses_small_m_for_k_above_1_and_still_matches_the_reference(olmoe, prompt_ids):
    _small_m_or_skip()
    with roe.roster(olmoe, roe.RoEConfig(roster_size=4, tau=1.5, skip_first=0, skip_last=0, seed=3)) as r:
        r.generate(prompt_ids, max_new_tokens=1)
        assert isinstance(r._small_m, SmallM)
        calls, product = [], r._small_m._product
        r._small_m._product = lambda x, w: calls.append(x.shape[0]) or product(x, w)
        fast = r.generate(prompt_ids, max_new_tokens=6)[0]
        slow = reference.generate_greedy(r, prompt_ids[0], 6)
    assert torch.equal(fast, slow)
    assert calls and set(calls) <= {1, 4}  # the clean prefix on one row, then the 4 members
    with roe.roster(olmoe, roe.RoEConfig(roster_size=1, tau=1.5)) as r:
        r.generate(prompt_ids, max_new_tokens=2)
        assert r._small_m is None  # one member: the untouched model, bit for bit


def test_decode_keeps_f_linear_when_the_kernel_cannot_be_built(olmoe, prompt_ids, monkeypatch):
    monkeypatch.setattr(SmallM, "_extension", False)  # as after a failed build
    assert SmallM.for_model(olmoe) is None
    with roe.roster(olmoe, roe.RoEConfig(roster_size=4, tau=1.5, skip_first=0, skip_last=0, seed=3)) as r:
        fast = r.generate(prompt_ids, max_new_tokens=4)[0]
        assert r._small_m is None
        slow = reference.generate_greedy(r, prompt_ids[0], 4)
    assert torch.equal(fast, slow)
