"""The plugin on roe's embedded default model: plain vLLM at K = 1, roe's engine at K > 1, batching and caching.

Engines: stock vLLM on a copy of the model that stores its tied head (``plain``), the RoE engine
(``roe_llm``), and a RoE engine with 16-token prefill chunks, 32-token blocks and prefix caching
(``chunked``).
"""

import pytest
import torch
from conftest import assert_each_as_alone, dense_logprobs, generate, roe_reference, tied_copy

V = 8192
STEPS = 32
PROMPTS = [[1216, 14, 199, 41, 396, 356], [25, 300, 12, 1871, 4842, 26, 199, 41, 396, 356, 12, 459], [40]]
SCHEDULE = [0.0, 0.2, 0.4, 0.1, 0.3, 0.0]  # one tau per MoE layer of the default model (6)


def _engine(**kw):
    from vllm import LLM

    return LLM(dtype="float32", max_model_len=512, max_logprobs=V, enable_prefix_caching=False, seed=0, **kw)


@pytest.fixture(scope="module")
def plain(default_model, tmp_path_factory):
    llm = _engine(model=str(tied_copy(default_model, tmp_path_factory.mktemp("tied"))), enforce_eager=True)
    yield llm
    del llm


@pytest.fixture(scope="module")
def roe_llm(default_model):
    import roe_vllm

    llm = _engine(**roe_vllm.engine_args(default_model, schedules={"calibrated": SCHEDULE}))
    yield llm
    del llm


@pytest.fixture(scope="module")
def reference():
    """roe's engine on PROMPTS[:2] at K = 4 and K = 8 (tau 0.3, seed 0), K = 8 on the schedule (seed 1), and
    K = 4 without a tau: the model's shipped schedule.json."""
    configs = [{"roster_size": 4, "tau": 0.3, "seed": 0}, {"roster_size": 8, "tau": 0.3, "seed": 0},
               {"roster_size": 8, "tau": SCHEDULE, "seed": 1}, {"roster_size": 4, "seed": 5}]
    outs = roe_reference({"model": None, "prompt_ids": PROMPTS[:2], "max_new_tokens": STEPS, "configs": configs})
    return dict(zip(("k4", "k8", "schedule", "model_default"), outs))


def _same_top(a, b) -> None:
    """Bit-for-bit equal returned logprobs (the dict of top tokens at every step)."""
    assert len(a.logprobs) == len(b.logprobs)
    for step, (x, y) in enumerate(zip(a.logprobs, b.logprobs)):
        assert {t: v.logprob for t, v in x.items()} == {t: v.logprob for t, v in y.items()}, f"step {step}"


@pytest.mark.parametrize("extra", [None, {"roster_size": 1, "tau": 0.5}, {"roster_size": 8, "tau": 0.0},
                                   {"roster_size": 4, "tau": [0.0] * 6, "seed": 3}])
def test_one_member_or_zero_tau_is_plain_vllm_bit_for_bit(plain, roe_llm, extra):
    want = generate(plain, PROMPTS, None, logprobs=5)
    got = generate(roe_llm, PROMPTS, extra, logprobs=5)
    for w, g in zip(want, got):
        assert list(g.token_ids) == list(w.token_ids)
        _same_top(g, w)


def test_plain_vllm_needs_the_tied_head(plain, roe_llm):
    """The stock class on the embedded checkpoint (no lm_head.weight) would run an untrained head: the
    plugin ties it, so its plain output is the model's (not token 0 forever)."""
    got = generate(roe_llm, PROMPTS[:1], None, max_tokens=8)[0]
    assert len(set(got.token_ids)) > 1


@pytest.mark.parametrize("name,extra", [("k4", {"roster_size": 4, "tau": 0.3, "seed": 0}),
                                        ("k8", {"roster_size": 8, "tau": 0.3, "seed": 0}),
                                        ("schedule", {"roster_size": 8, "schedule": "calibrated", "seed": 1}),
                                        ("model_default", {"roster_size": 4, "seed": 5})])
def test_matches_roe_engine(roe_llm, plain, reference, name, extra):
    got = generate(roe_llm, PROMPTS[:2], extra, max_tokens=STEPS, logprobs=V)
    base = generate(plain, PROMPTS[:2], None, max_tokens=STEPS, logprobs=V)
    for out, ref, clean in zip(got, reference[name], base):
        assert list(out.token_ids) == ref["tokens"]
        mine, theirs = dense_logprobs(out, V), torch.tensor(ref["logprobs"])
        assert not torch.isnan(mine).any()
        assert (mine - theirs).abs().max().item() < 1e-4
        assert (mine - dense_logprobs(clean, V)).abs().max().item() > 1e-2  # RoE changed the distribution


def test_mixed_batch_gives_each_its_own(roe_llm):
    extras = [{"roster_size": 4, "tau": 0.3, "seed": 0}, None, {"roster_size": 8, "tau": SCHEDULE, "seed": 1},
              {"roster_size": 2, "tau": 0.5, "skip_first": 0, "seed": 7}]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    assert_each_as_alone(roe_llm, prompts, extras)


def test_sampling_acts_on_the_average(roe_llm):
    """Seeded sampling is reproducible and differs between the plain and the RoE distribution."""
    extra = {"roster_size": 4, "tau": 0.3, "seed": 0}
    a = generate(roe_llm, PROMPTS[:1], extra, temperature=1.0, seed=5)[0]
    b = generate(roe_llm, PROMPTS[:1], extra, temperature=1.0, seed=5)[0]
    c = generate(roe_llm, PROMPTS[:1], None, temperature=1.0, seed=5)[0]
    assert list(a.token_ids) == list(b.token_ids)
    assert list(a.token_ids) != list(c.token_ids)


@pytest.mark.parametrize("extra", [{"roster_size": 0}, {"roster_size": 4, "tau": -1.0}, {"roster_size": 4, "tau": "x"},
                                   {"roster_size": 4, "tau": [0.3, 0.3]}, {"roster_size": 4, "schedule": "nope"},
                                   {"roster_size": 4, "tau": 0.3, "schedule": "calibrated"},
                                   {"roster_size": 4, "skip_first": 4, "skip_last": 3, "tau": 0.3},
                                   {"roster_size": 4, "seed": -1}])
def test_invalid_requests_are_refused_and_the_engine_survives(roe_llm, extra):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError):
        generate(roe_llm, PROMPTS[:1], extra, max_tokens=2)
    assert len(generate(roe_llm, PROMPTS[:1], {"roster_size": 2, "tau": 0.3}, max_tokens=2)[0].token_ids) == 2


def test_prompt_logprobs_refused_with_roe(roe_llm):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="prompt_logprobs"):
        generate(roe_llm, PROMPTS[:1], {"roster_size": 4, "tau": 0.3}, max_tokens=2, prompt_logprobs=1)


@pytest.fixture(scope="module")
def chunked(default_model):
    import roe_vllm
    from vllm import LLM

    llm = LLM(**roe_vllm.engine_args(default_model, dtype="float32", max_model_len=512, max_logprobs=20,
                                     enable_chunked_prefill=True, max_num_batched_tokens=16, block_size=32,
                                     enable_prefix_caching=True, engine_seed=0))
    yield llm
    del llm


def test_chunked_prefill_and_prefix_cache_change_nothing(roe_llm, chunked):
    long_prompt = (PROMPTS[1] * 9)[:100]  # 100 tokens: 7 chunks of 16, four 32-token blocks
    extra = {"roster_size": 8, "tau": 0.3, "seed": 2}
    want = generate(roe_llm, [long_prompt], extra, logprobs=20)[0]
    first = generate(chunked, [long_prompt], extra, logprobs=20)[0]
    again = chunked.generate(**_tokens(long_prompt, extra))[0]
    assert again.num_cached_tokens >= 64  # the second run read its first blocks from the prefix cache
    for got in (first, again.outputs[0]):
        assert list(got.token_ids) == list(want.token_ids)
        for x, y in zip(got.logprobs, want.logprobs, strict=True):
            assert_same_top(x, y, 1e-4)


def assert_same_top(x: dict, y: dict, atol: float) -> None:
    """Two steps' top-n log-probs agree: equal within ``atol`` where both list a token, and a token only one
    side lists sits at the other side's boundary (a near-tie swapped at rank n), not inside its list."""
    for a, b in ((x, y), (y, x)):
        floor = min(lp.logprob for lp in b.values())
        for t, lp in a.items():
            if t in b:
                assert abs(lp.logprob - b[t].logprob) < atol, (t, lp.logprob, b[t].logprob)
            else:
                assert lp.logprob <= floor + atol, (t, lp.logprob, floor)


def _tokens(prompt, extra):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    return {"prompts": [TokensPrompt(prompt_token_ids=prompt)], "use_tqdm": False,
            "sampling_params": SamplingParams(max_tokens=STEPS, temperature=0.0, logprobs=20, ignore_eos=True,
                                              extra_args=extra)}
