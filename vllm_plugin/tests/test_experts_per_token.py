"""The request field ``experts_per_token`` (the MoE-PHDS dial) on vLLM: roe's semantics, on roe's default model.

The default model routes A = 4 of E = 32 experts. Ground truths: the same weights in stock vLLM built with
``num_experts_per_tok = 2`` (``plain_k2``: a dialled K = 1 request must equal it bit for bit), and roe's
transformers engine with ``RoEConfig(experts_per_token=k)`` (tokens identical, log-probs within 1e-4 over
the vocabulary, at K = 1 and K = 4, for k = 2 < A and k = 6 > A). The model's own k changes nothing, bit for
bit. The fused MoE's top-k is the routing's width: padding columns of weight 0 are checked on the kernel
itself. Dialled prefixes never share the prefix cache with another k. Engines: ``roe_llm`` (RoE, prefix
caching on, 32-token blocks) and ``plain_k2``; Mixtral and Qwen3-MoE (routers that renormalise over the k
chosen) on tiny checkpoints of test_families.py, against roe's engine.
"""

import json

import pytest
import torch
from conftest import assert_each_as_alone, dense_logprobs, generate, roe_reference, tied_copy
from test_families import FAMILIES, save_tiny

V = 8192
STEPS = 32
OWN_K, EXPERTS = 4, 32
PROMPTS = [[1216, 14, 199, 41, 396, 356], [25, 300, 12, 1871, 4842, 26, 199, 41, 396, 356, 12, 459]]
DIALLED = {"k1_2": {"roster_size": 1, "experts_per_token": 2},
           "k4_2": {"roster_size": 4, "tau": 0.3, "seed": 0, "experts_per_token": 2},
           "k1_6": {"roster_size": 1, "experts_per_token": 6},
           "k4_6": {"roster_size": 4, "tau": 0.3, "seed": 0, "experts_per_token": 6}}


K1_2 = DIALLED["k1_2"]  # NOTE: as in roe.RoEConfig, a request that gives RoE keys but no roster_size has K = 8


def _engine(**kw):
    from vllm import LLM

    return LLM(dtype="float32", max_model_len=512, max_logprobs=V, seed=0, **kw)


@pytest.fixture(scope="module")
def roe_llm(default_model):
    import roe_vllm

    llm = _engine(**roe_vllm.engine_args(default_model, enable_prefix_caching=True, block_size=32))
    yield llm
    del llm


@pytest.fixture(scope="module")
def plain_k2(default_model, tmp_path_factory):
    """Stock vLLM on the default model's weights, built with 2 experts per token."""
    path = tied_copy(default_model, tmp_path_factory.mktemp("k2"))
    config = json.loads((path / "config.json").read_text())
    assert config["num_experts_per_tok"] == OWN_K
    (path / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 2}))
    llm = _engine(model=str(path), enforce_eager=True, enable_prefix_caching=False)
    yield llm
    del llm


@pytest.fixture(scope="module")
def reference():
    """roe's engine with each DIALLED setting on PROMPTS, and the undialled K = 4 roster."""
    configs = list(DIALLED.values()) + [{"roster_size": 4, "tau": 0.3, "seed": 0}]
    outs = roe_reference({"model": None, "prompt_ids": PROMPTS, "max_new_tokens": STEPS, "configs": configs})
    return dict(zip([*DIALLED, "k4_own"], outs))


def _same(a, b) -> None:
    """Identical tokens and bit-for-bit equal returned logprobs."""
    assert list(a.token_ids) == list(b.token_ids)
    for step, (x, y) in enumerate(zip(a.logprobs, b.logprobs, strict=True)):
        assert {t: v.logprob for t, v in x.items()} == {t: v.logprob for t, v in y.items()}, f"step {step}"


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("settings", [{"roster_size": 1}, {"roster_size": 4, "tau": 0.3, "seed": 0}])
def test_the_models_own_k_is_bit_for_bit_no_field(roe_llm, settings):
    without = generate(roe_llm, PROMPTS, settings, logprobs=20)
    with_own = generate(roe_llm, PROMPTS, {**settings, "experts_per_token": OWN_K}, logprobs=20)
    for a, b in zip(with_own, without):
        _same(a, b)


def test_k1_dial_is_the_model_built_with_k_bit_for_bit(roe_llm, plain_k2):
    """K = 1 with experts_per_token = 2: no member, but every row (prefill too) routes 2 experts, padded to
    the kernel's 4 columns with weight 0: exactly stock vLLM built with num_experts_per_tok = 2."""
    want = generate(plain_k2, PROMPTS, None, logprobs=20)
    got = generate(roe_llm, PROMPTS, K1_2, logprobs=20)
    own = generate(roe_llm, PROMPTS, None, logprobs=20)
    for g, w, o in zip(got, want, own):
        _same(g, w)
        assert any(abs(x[t].logprob - y[t].logprob) > 1e-2 for x, y in zip(g.logprobs, o.logprobs)
                   for t in x if t in y), "experts_per_token=2 changed nothing"


@pytest.mark.parametrize("name", list(DIALLED))
def test_matches_roe_engine(roe_llm, reference, name):
    got = generate(roe_llm, PROMPTS, DIALLED[name], max_tokens=STEPS, logprobs=V)
    undialled = reference["k4_own" if DIALLED[name]["roster_size"] == 4 else "k1_2"]
    for out, ref in zip(got, reference[name]):
        assert list(out.token_ids) == ref["tokens"]
        mine, theirs = dense_logprobs(out, V), torch.tensor(ref["logprobs"])
        assert not torch.isnan(mine).any() and torch.isfinite(theirs).all()
        assert (mine - theirs).abs().max().item() < 1e-4
    if name != "k1_2":  # the settings matter: each differs from another k (K = 1) or from the undialled roster
        gap = max((torch.tensor(r["logprobs"]) - torch.tensor(u["logprobs"])).abs().max().item()
                  for r, u in zip(reference[name], undialled))
        assert gap > 1e-2


def test_mixed_batch_gives_each_its_own(roe_llm):
    """Rows of different k (and none) in one forward route W = 6 columns; each request gets what it gets alone."""
    extras = [K1_2, None, DIALLED["k4_6"], {"roster_size": 2, "tau": 0.5, "seed": 7},
              {"roster_size": 4, "tau": 0.3, "seed": 0, "experts_per_token": 1}]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    assert_each_as_alone(roe_llm, prompts, extras)


def test_prefix_cache_never_mixes_ks(roe_llm, plain_k2):
    """A 128-token prompt run plain fills four 32-token blocks; the same prompt dialled to k = 2 must not read
    them (its KV cache is the 2-expert model's): it gets the 2-expert model's output, and the plain run again
    reads the cache it wrote."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = (PROMPTS[1] * 11)[:128]

    def run(llm, extra):
        params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=20, ignore_eos=True, extra_args=extra)
        return llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]

    plain = run(roe_llm, None)
    dialled = run(roe_llm, K1_2)
    _same(dialled.outputs[0], run(plain_k2, None).outputs[0])
    again = run(roe_llm, None)
    assert again.num_cached_tokens >= 96
    _same(again.outputs[0], plain.outputs[0])
    assert run(roe_llm, K1_2).num_cached_tokens >= 96  # k = 2 prefixes are shared among k = 2


@pytest.mark.parametrize("extra,message", [({"experts_per_token": EXPERTS + 1}, "exceeds the model's 32 experts"),
                                           ({"experts_per_token": 0}, "experts_per_token must be >= 1"),
                                           ({"experts_per_token": 2.0}, "experts_per_token must be an int"),
                                           ({"experts_per_token": True}, "experts_per_token must be an int")])
def test_invalid_values_are_refused_and_the_engine_survives(roe_llm, extra, message):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=message) as err:
        generate(roe_llm, PROMPTS[:1], {"roster_size": 1, **extra}, max_tokens=2)
    if extra["experts_per_token"] == EXPERTS + 1:
        assert "own k is 4" in str(err.value)
    survivor = {"roster_size": 1, "experts_per_token": EXPERTS}
    assert len(generate(roe_llm, PROMPTS[:1], survivor, max_tokens=2)[0].token_ids) == 2


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def renormalising(request, tmp_path_factory):
    import roe_vllm
    from vllm import LLM

    path = save_tiny(FAMILIES[request.param], tmp_path_factory.mktemp(request.param))
    llm = LLM(**roe_vllm.engine_args(path, dtype="float32", max_model_len=256, max_logprobs=256,
                                     skip_tokenizer_init=True, enable_prefix_caching=False, engine_seed=0))
    yield request.param, path, llm
    del llm


def test_renormalising_families_match_roe_engine(renormalising):
    """Own k = 2 of 8 experts, weights renormalised over the chosen: k = 1 (weight 1) and k = 3 in a noisy roster."""
    name, path, llm = renormalising
    prompts = [[5, 17, 99, 3, 250, 41, 7], [200, 1, 64]]
    configs = [{"roster_size": 1, "experts_per_token": 1},
               {"roster_size": 3, "tau": 1.0, "seed": 9, "skip_first": 0, "experts_per_token": 3}]
    refs = roe_reference({"model": str(path), "prompt_ids": prompts, "max_new_tokens": 16, "configs": configs})
    plain = generate(llm, prompts, None, max_tokens=16, logprobs=256, detokenize=False)
    for cfg, ref in zip(configs, refs):
        got = generate(llm, prompts, cfg, max_tokens=16, logprobs=256, detokenize=False)
        for out, want, clean in zip(got, ref, plain):
            assert list(out.token_ids) == want["tokens"], name
            mine = dense_logprobs(out, 256)
            assert (mine - torch.tensor(want["logprobs"])).abs().max().item() < 1e-4, name
            assert (mine - dense_logprobs(clean, 256)).abs().max().item() > 1e-3, name


# ---------------------------------------------------------------- the pieces alone (no engine)


def test_fused_moe_takes_any_width_and_zero_weight_columns_change_nothing():
    """vLLM's CPU fused MoE reads top-k from the routing's width; padding a row's k columns with its first
    expert at weight 0 gives the k-column result bit for bit, for k below and above the model's A = 4."""
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    g = torch.Generator().manual_seed(0)
    E, D, I, T, A = 32, 256, 96, 19, 4
    w13 = cpu_prepack_moe_weight(torch.randn(E, 2 * I, D, generator=g) * 0.05, "vec")
    w2 = cpu_prepack_moe_weight(torch.randn(E, D, I, generator=g) * 0.05, "vec")
    hidden_TD, logits_TE = torch.randn(T, D, generator=g), torch.randn(T, E, generator=g)

    def moe(weights_TW, ids_TW):
        out_TD = torch.empty(T, D)
        cpu_fused_moe(out_TD, hidden_TD, w13, w2, None, None, weights_TW.float().contiguous(),
                      ids_TW.int().contiguous(), "silu", "vec", False)
        return out_TD

    for k, W in [(1, A), (2, A), (2, 6), (6, 6), (6, 8)]:
        values_Tk, ids_Tk = torch.topk(logits_TE, k, dim=-1, sorted=False)
        weights_Tk = torch.softmax(values_Tk, dim=-1)
        padded = moe(torch.cat([weights_Tk, torch.zeros(T, W - k)], 1),
                     torch.cat([ids_Tk, ids_Tk[:, :1].expand(T, W - k)], 1))
        assert torch.equal(padded, moe(weights_Tk, ids_Tk)), (k, W)
        assert torch.isfinite(padded).all()


def test_dial_pads_with_the_first_expert_at_weight_zero():
    from roe_vllm.routing import CleanWeights, dial

    g = torch.Generator().manual_seed(1)
    logits_RE = torch.randn(5, 8, generator=g)
    noise_RE = torch.zeros(5, 8)
    noise_RE[3:] = torch.randn(2, 8, generator=g)  # rows 3, 4: noisy member rows
    noisy_RE = logits_RE + noise_RE
    for renormalize in (False, True):
        rule = CleanWeights(scoring="softmax", renormalize=renormalize, grouped=False, scaling=1.0)
        ids_RA = torch.topk(noisy_RE, 4, dim=-1, sorted=False).indices.int()
        weights_RA = rule(logits_RE, ids_RA)
        k_R = torch.tensor([0, 2, 6, 1, 4])
        weights_RW, ids_RW = dial(rule, logits_RE, noisy_RE, weights_RA, ids_RA, k_R)
        assert weights_RW.shape == ids_RW.shape == (5, 6) and ids_RW.dtype == torch.int32
        for r, k in enumerate([4, 2, 6, 1, 4]):
            chosen = set(torch.topk(noisy_RE[r], k).indices.tolist())
            assert set(ids_RW[r, :k].tolist()) == chosen
            assert (ids_RW[r, k:] == ids_RW[r, 0]).all() and (weights_RW[r, k:] == 0).all()
            want = torch.softmax(logits_RE[r], -1)[ids_RW[r, :k].long()]  # clean gating at the k chosen
            torch.testing.assert_close(weights_RW[r, :k], want / want.sum() if renormalize else want)
        assert torch.equal(weights_RW[[0, 4], :4], weights_RA[[0, 4]])
        assert torch.equal(ids_RW[[0, 4], :4], ids_RA[[0, 4]])


def test_settings_resolve_and_refuse_like_roe():
    from types import SimpleNamespace

    from roe_vllm.settings import EngineSettings, check_request

    engine = EngineSettings.parse({"roe": {"roster_size": 1, "experts_per_token": 2}})
    assert engine.experts_per_token(None) == 2 and engine.experts_per_token({"experts_per_token": 6}) == 6
    assert engine.roster({"experts_per_token": 3}, 6) is None  # K = 1: no members, the dial still applies
    assert engine.roster({"roster_size": 4, "tau": 0.3, "experts_per_token": 3}, 6).experts_per_token == 3
    assert EngineSettings.parse(None).experts_per_token(None) is None
    assert EngineSettings.parse(None).experts_per_token({"roster_size": 4}) is None
    with pytest.raises(ValueError, match="experts_per_token must be >= 1"):
        EngineSettings.parse({"roe": {"experts_per_token": 0}})
    params = SimpleNamespace(extra_args={"experts_per_token": 9}, prompt_logprobs=None)
    with pytest.raises(ValueError, match=r"experts_per_token=9 exceeds the model's 8 experts .*own k is 2"):
        check_request(EngineSettings.parse(None), params, 6, (8, 2))
    check_request(EngineSettings.parse(None), SimpleNamespace(extra_args={"experts_per_token": 8},
                                                                  prompt_logprobs=None), 6, (8, 2))


def test_server_fields_move_and_are_checked():
    """roe-vllm serve's middleware: experts_per_token travels in vllm_xargs; beyond the model's experts a 400."""
    from roe_vllm.serve import FieldError, ServerRoE, moved
    from roe_vllm.settings import EngineSettings

    server = ServerRoE(engine=EngineSettings.parse({"roe": {"roster_size": 1}}), moe_layers=6, experts=(32, 4))
    body = {"prompt": "x", "experts_per_token": 2, "roster_size": 4, "tau": 0.3}
    assert moved(body, server) == {"prompt": "x", "vllm_xargs": {"experts_per_token": 2, "roster_size": 4,
                                                                 "tau": 0.3}}
    for value, message in [(33, "exceeds the model's 32 experts"), (0, ">= 1"), ("2", "integer"), (2.0, "integer")]:
        with pytest.raises(FieldError, match=message):
            moved({"prompt": "x", "experts_per_token": value}, server)
