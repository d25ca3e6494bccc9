"""tensor_parallel_size=2 (two worker processes, one core each) gives the tokens of TP=1, which equal
roe's engine (test_default_model.py): checked here against roe's engine directly, with one engine start."""

import pytest
import torch
from conftest import dense_logprobs, generate, roe_reference

PROMPTS = [[1216, 14, 199, 41, 396, 356]]
STEPS = 32


@pytest.mark.tp2
def test_tensor_parallel_2_gives_the_single_process_tokens(default_model, monkeypatch):
    import roe_vllm
    from vllm import LLM

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # automatic binding wants one NUMA node per rank
    cfg = {"roster_size": 4, "tau": 0.3, "seed": 0}
    want = roe_reference({"model": None, "prompt_ids": PROMPTS, "max_new_tokens": STEPS, "configs": [cfg]})[0]
    llm = LLM(**roe_vllm.engine_args(default_model, dtype="float32", max_model_len=256, tensor_parallel_size=2,
                                     max_logprobs=8192, enable_prefix_caching=False, engine_seed=0))
    try:
        got = generate(llm, PROMPTS, cfg, max_tokens=STEPS, logprobs=8192)
    finally:
        del llm
    for out, ref in zip(got, want):
        assert list(out.token_ids) == ref["tokens"]
        assert (dense_logprobs(out, 8192) - torch.tensor(ref["logprobs"])).abs().max().item() < 1e-4
