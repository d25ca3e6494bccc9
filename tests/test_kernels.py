"""The faster products of decode steps (packed LM head, small-M kernel): as the model's, only inside a step."""

import sys
from dataclasses import replace

import pytest
import torch

import roe
from roe import kernels, reference
from roe.kernels import PackedHead, SmallM
from tests.conftest import small_m_or_skip, tiny_olmoe, turn_decode_kernels_off
from tests.test_roster import (  # noqa: F401  rerun here with the kernels on
    test_generate_equals_the_reference,
    test_k1_and_tau0_reproduce_the_model_exactly,
    test_sliding_window_olmoe_like_mixtral_matches_reference,
)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")

NOISY = roe.RoEConfig(roster_size=4, tau=1.5, skip_first=0, skip_last=0, seed=3)


@pytest.fixture
def decode_kernels_off():
    """Overrides tests/conftest.py's autouse fixture: this module tests the kernels, so they stay on."""


def _replaced(model) -> list[str]:
    """The linears whose forward is replaced right now (by a kernel)."""
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__]


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


@pytest.mark.parametrize("rows", range(1, SmallM.MAX_ROWS + 1))
def test_small_m_product_equals_f_linear(rows):
    extension = small_m_or_skip()
    gen = torch.Generator().manual_seed(rows)
    for out_features, in_features in ((40, 64), (7, 256)):
        x, w = torch.randn(rows, in_features, generator=gen), torch.randn(out_features, in_features, generator=gen)
        torch.testing.assert_close(extension.small_m_linear(x, w), torch.nn.functional.linear(x, w),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        extension.small_m_linear(torch.randn(2, 48), torch.randn(4, 48))


def test_small_m_covers_the_decoder_linears_only_inside_the_block():
    small_m_or_skip()
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
    small_m_or_skip()
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


@pytest.fixture
def fake_builds(monkeypatch, tmp_path):
    """Kernel builds into tmp_path, recorded, in milliseconds: a build writes the library file and
    gives a module whose product is F.linear; importing a built library gives the same module."""
    builds = []

    class Module:
        small_m_linear = staticmethod(torch.nn.functional.linear)

    def compile_(name, directory, kernel):
        builds.append(directory)
        (directory / f"{name}.so").write_bytes(b"")
        return Module

    monkeypatch.setattr(kernels, "KERNEL_ROOT", tmp_path)
    monkeypatch.setattr(kernels, "_compile", compile_)
    monkeypatch.setattr(kernels, "_import", lambda name, library: Module)
    monkeypatch.setattr(SmallM, "_extension", None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    return builds


def new_process(monkeypatch):
    monkeypatch.setattr(SmallM, "_extension", None)


def test_each_environment_builds_once_into_its_own_folder(fake_builds, monkeypatch, capsys):
    """Two venvs used to share one build folder whose build file named one venv's torch include path,
    so alternating between them rebuilt every time (36 rebuilds in 80 minutes were seen)."""
    import torch.utils.cpp_extension as cpp

    venv_a, venv_b = "/venvs/a", "/venvs/b"
    for prefix in (venv_a, venv_b, venv_a, venv_b, venv_a):
        new_process(monkeypatch)
        monkeypatch.setattr(sys, "prefix", prefix)
        assert kernels.prepare()
    assert len(fake_builds) == 2 and fake_builds[0] != fake_builds[1]
    assert all(build.parent == kernels.KERNEL_ROOT for build in fake_builds)
    assert capsys.readouterr().err.count("compiling roe's decode kernel once for this environment") == 2
    new_process(monkeypatch)
    include = cpp.include_paths()
    monkeypatch.setattr(cpp, "include_paths", lambda *a, **k: ["/other/torch/include", *include[1:]])
    assert kernels.prepare() and len(fake_builds) == 3  # another torch build: its own folder
    assert len({b.name for b in fake_builds}) == 3


def test_prepare_is_idempotent(fake_builds, capsys):
    assert kernels.prepare() and kernels.prepare() and SmallM.extension() is not None
    assert len(fake_builds) == 1
    assert capsys.readouterr().err.count("compiling") == 1


def test_a_failed_build_falls_back_to_f_linear_with_a_message(fake_builds, monkeypatch, capsys, olmoe, prompt_ids):
    def broken(name, directory, kernel):
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(kernels, "_compile", broken)
    assert not kernels.prepare() and not kernels.prepare()  # tried once per process
    err = capsys.readouterr().err
    assert err.count("decode kernel unavailable (RuntimeError: Error building extension: g++ not found); "
                     "using F.linear") == 1
    assert SmallM.for_model(olmoe) is None
    with roe.roster(olmoe, roe.RoEConfig(roster_size=4, tau=1.5, skip_first=0, skip_last=0, seed=3)) as r:
        fast = r.generate(prompt_ids, max_new_tokens=3)[0]
        slow = reference.generate_greedy(r, prompt_ids[0], 3)
    assert torch.equal(fast, slow)


def test_a_built_kernel_is_imported_without_compiling(monkeypatch):
    """The real build of this environment, then a new process: it loads without ninja or a compiler."""
    small_m_or_skip()

    def no_compile(name, directory, kernel):
        raise AssertionError("rebuilt although this environment's kernel is built")

    new_process(monkeypatch)
    monkeypatch.setattr(kernels, "_compile", no_compile)
    assert kernels.prepare()
    x, w = torch.randn(3, 64), torch.randn(5, 64)
    torch.testing.assert_close(SmallM.extension().small_m_linear(x, w), torch.nn.functional.linear(x, w))


def test_kernels_can_be_turned_off(olmoe, prompt_ids):
    """RoEConfig(kernels=False): no product of a decode step is replaced, and greedy decoding equals
    the slow reference bit for bit (with them on it equals it too, through other roundings)."""
    off = replace(NOISY, kernels=False)
    with roe.roster(olmoe, off) as r:
        with torch.no_grad(), r.decode_kernels():
            assert _replaced(olmoe) == []
        fast = r.generate(prompt_ids, max_new_tokens=4)[0]
        slow = reference.generate_greedy(r, prompt_ids[0], 4)
    assert torch.equal(fast, slow)
    with roe.roster(olmoe, NOISY) as r, torch.no_grad(), r.decode_kernels():
        assert "lm_head" in _replaced(olmoe)  # on by default


@pytest.mark.parametrize("kernels", [True, False])
def test_k1_is_the_untouched_model_with_kernels_on_or_off(olmoe, prompt_ids, kernels):
    want = olmoe.generate(prompt_ids, max_new_tokens=6, do_sample=False)
    with roe.roster(olmoe, roe.RoEConfig(roster_size=1, tau=1.5, kernels=kernels)) as r:
        with torch.no_grad(), r.decode_kernels():
            assert _replaced(olmoe) == []
        assert torch.equal(r.generate(prompt_ids, max_new_tokens=6), want)


@pytest.mark.parametrize("value", ["no", 0, None])
def test_config_rejects_a_kernels_setting_that_is_not_a_bool(value):
    with pytest.raises(TypeError, match="kernels must be a bool"):
        roe.RoEConfig(kernels=value)


def test_the_suites_fixture_turns_the_kernels_off(olmoe, monkeypatch):
    """What tests/conftest.py does to every other module: a K > 1 decode step replaces nothing."""
    with roe.roster(olmoe, NOISY) as r, torch.no_grad(), r.decode_kernels():
        assert _replaced(olmoe)
    turn_decode_kernels_off(monkeypatch)
    with roe.roster(olmoe, NOISY) as r, torch.no_grad(), r.decode_kernels():
        assert _replaced(olmoe) == []


def test_the_analysis_with_its_kernels_does_not_keep_its_model_alive():
    """test_analysis checks this with the kernels off; the packed head and the small-M kernel hold
    the model's linears, not the model."""
    import gc
    import weakref

    model = tiny_olmoe()
    with roe.roster(model, NOISY) as r:
        r.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
        assert r._head is not None
    alive = weakref.ref(model)
    del model, r
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("args", [["generate", "hello", "-K", "2", "--max-new-tokens", "3"],
                                  ["bench", "--ks", "2", "--methods", "roster", "--prompt-tokens", "4",
                                   "--new-tokens", "2"]])
def test_the_no_kernels_flag_reaches_the_roster(monkeypatch, saved_model, capsys, args):
    import json

    from roe.cli import main

    products = []
    product = PackedHead.product
    monkeypatch.setattr(PackedHead, "product", lambda self, x: products.append(x.shape) or product(self, x))
    shown = []
    for flag in ([], ["--no-kernels"]):
        products.clear()
        main([*args, "--model", str(saved_model), *flag, "--json"])
        shown.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
        assert bool(products) == (flag == []), flag
    if args[0] == "bench":
        assert [one["conditions"]["kernels"] for one in shown] == [True, False]


def test_bench_prepares_the_kernel_before_timing(monkeypatch, saved_model, capsys):
    """A first roster with K > 1 used to compile inside the first timed round (K=8 13x K=1)."""
    import roe.bench
    from roe.cli import main

    events = []
    measure = roe.bench.measure
    monkeypatch.setattr(kernels, "prepare", lambda: events.append("prepare") or True)
    monkeypatch.setattr(roe.bench, "measure", lambda *a, **k: events.append("measure") or measure(*a, **k))
    main(["bench", "--model", str(saved_model), "--ks", "1,2", "--methods", "roster", "--prompt-tokens", "4",
          "--new-tokens", "2", "--json"])
    assert events[0] == "prepare" and events.count("prepare") == 1 and events.count("measure") == 4
