"""Parallel sampling (n > 1) with RoE: choice i runs with the RoE seed + i, as in ``roe serve``.

vLLM fans a request with n > 1 out into n child requests that share the parent's ``extra_args``;
without the plugin's seeding every choice would run the same RoE noise. Each choice must equal the
request sent alone with ``n = 1``, the RoE seed + i and vLLM's sampling seed + i (which vLLM itself
gives child i when the request has a sampling seed): tokens identical, returned log-probs within the
tolerance of a batch against a request alone. One RoE engine on the embedded default model, with
engine defaults (K = 4, tau 0.3, seed 5), so a request without ``extra_args`` tests the resolved default seed.
"""

from types import SimpleNamespace

import pytest
from conftest import generate

PROMPT = [1216, 14, 199, 41, 396, 356]
STEPS = 16
TOP = 20  # log-probs returned per step
TOL = 1e-4  # a batch against a request alone (test_default_model.py's mixed batch)
DEFAULT_SEED = 5


@pytest.fixture(scope="module")
def roe_llm(default_model):
    import roe_vllm
    from vllm import LLM

    llm = LLM(dtype="float32", max_model_len=512, max_logprobs=TOP, enable_prefix_caching=False, seed=0,
              **roe_vllm.engine_args(default_model, roster_size=4, tau=0.3, seed=DEFAULT_SEED))
    yield llm
    del llm


def _choices(llm, n: int, extra_args: dict | None, **sampling) -> list:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(n=n, max_tokens=STEPS, ignore_eos=True, logprobs=TOP, extra_args=extra_args, **sampling)
    outs = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params, use_tqdm=False)
    return sorted(outs[0].outputs, key=lambda o: o.index)


def _gap(a, b) -> float:
    """The largest difference of two completions' returned log-probs (inf if tokens or top tokens differ)."""
    if list(a.token_ids) != list(b.token_ids):
        return float("inf")
    gap = 0.0
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        if x.keys() != y.keys():
            return float("inf")
        gap = max(gap, max(abs(x[t].logprob - y[t].logprob) for t in x))
    return gap


def test_sampled_choice_i_is_the_request_alone_with_seed_plus_i(roe_llm):
    extra = {"roster_size": 4, "tau": 0.3, "seed": 3}
    choices = _choices(roe_llm, 2, extra, temperature=1.0, seed=11)
    assert len(choices) == 2
    for i, choice in enumerate(choices):
        alone = _choices(roe_llm, 1, {**extra, "seed": 3 + i}, temperature=1.0, seed=11 + i)[0]
        assert _gap(choice, alone) < TOL, i
    # what every choice ran before: the request's own RoE seed (only vLLM's sampling seed + 1)
    shared = _choices(roe_llm, 1, extra, temperature=1.0, seed=12)[0]
    assert _gap(choices[1], shared) > 100 * TOL


def test_argmax_choices_take_the_engine_default_seed_plus_i(roe_llm):
    """No extra_args and no sampling seed: vLLM shares one params object among the children there.
    top_k=1 makes the choices comparable (vLLM refuses n > 1 with temperature 0)."""
    choices = _choices(roe_llm, 3, None, temperature=1.0, top_k=1)
    assert len(choices) == 3
    for i, choice in enumerate(choices):
        alone = _choices(roe_llm, 1, {"seed": DEFAULT_SEED + i}, temperature=1.0, top_k=1)[0]
        assert _gap(choice, alone) < TOL, i
    assert _gap(choices[0], choices[1]) > 100 * TOL and _gap(choices[1], choices[2]) > 100 * TOL


def test_choice_seeds_beyond_2_63_are_refused(roe_llm):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=r"2\*\*63"):
        _choices(roe_llm, 2, {"seed": (1 << 63) - 1}, temperature=1.0)
    assert len(generate(roe_llm, [PROMPT], {"seed": (1 << 63) - 1}, max_tokens=2)[0].token_ids) == 2  # n = 1 runs


def _vllm_config(architecture: str, additional=None):
    return SimpleNamespace(model_config=SimpleNamespace(architecture=architecture, model=None),
                           additional_config=additional)


@pytest.mark.parametrize("architecture,additional,n,extra,want", [
    ("RoEOlmoeForCausalLM", {"roe": {"roster_size": 4, "seed": 9}}, 2, None, {"seed": 9}),
    ("RoEOlmoeForCausalLM", None, 3, {"roster_size": 2, "seed": 4, "x": 1}, {"roster_size": 2, "seed": 4, "x": 1}),
    ("RoEOlmoeForCausalLM", None, 2, {"roster_size": 2}, {"roster_size": 2, "seed": 0}),  # roe's default seed
    ("RoEOlmoeForCausalLM", None, 2, {"other": 1}, None),  # no RoE settings: extra_args as given
    ("RoEOlmoeForCausalLM", {"roe": {"roster_size": 4}}, 1, None, None),  # one choice
    ("OlmoeForCausalLM", None, 2, {"roster_size": 2, "seed": 4}, None),  # a stock engine is left alone
])
def test_choice_seeds_pin_the_resolved_seed(architecture, additional, n, extra, want):
    from roe_vllm.requests import choice_seeds

    seeds = choice_seeds(_vllm_config(architecture, additional), SimpleNamespace(n=n, extra_args=extra))
    assert seeds == want
    if want is not None:
        assert [seeds.choice(i)["seed"] for i in range(n)] == [want["seed"] + i for i in range(n)]
        assert seeds.choice(1) == {**want, "seed": want["seed"] + 1} and type(seeds.choice(1)) is dict
