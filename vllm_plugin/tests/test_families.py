"""OLMoE, Mixtral and Qwen3-MoE: tiny random checkpoints (saved here from transformers config classes)
run with RoE in vLLM and agree with roe's transformers engine, token for token and in log-probs."""

import pytest
import torch
from conftest import dense_logprobs, generate, roe_reference

VOCAB = 256
STEPS = 16
PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [200, 1, 64]]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False)


def olmoe():
    from transformers import OlmoeConfig

    return OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)


def mixtral():
    from transformers import MixtralConfig

    return MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2, sliding_window=None)


def qwen3_moe():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**COMMON, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])


FAMILIES = {"olmoe": olmoe, "mixtral": mixtral, "qwen3_moe": qwen3_moe}


def save_tiny(make_config, path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = make_config()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    import roe_vllm
    from vllm import LLM

    path = save_tiny(FAMILIES[request.param], tmp_path_factory.mktemp(request.param))
    llm = LLM(**roe_vllm.engine_args(path, dtype="float32", max_model_len=256, max_logprobs=VOCAB,
                                     skip_tokenizer_init=True, enable_prefix_caching=False, engine_seed=0))
    yield request.param, path, llm
    del llm


def test_family_matches_roe_engine(family):
    name, path, llm = family
    configs = [{"roster_size": 4, "tau": 0.5, "seed": 0}, {"roster_size": 3, "tau": 1.0, "seed": 9, "skip_first": 0}]
    refs = roe_reference({"model": str(path), "prompt_ids": PROMPTS, "max_new_tokens": STEPS, "configs": configs})
    plain = generate(llm, PROMPTS, None, max_tokens=STEPS, logprobs=VOCAB, detokenize=False)
    for cfg, ref in zip(configs, refs):
        got = generate(llm, PROMPTS, cfg, max_tokens=STEPS, logprobs=VOCAB, detokenize=False)
        moved = 0.0
        for out, want, clean in zip(got, ref, plain):
            assert list(out.token_ids) == want["tokens"], name
            mine = dense_logprobs(out, VOCAB)
            assert (mine - torch.tensor(want["logprobs"])).abs().max().item() < 1e-4, name
            moved = max(moved, (mine - dense_logprobs(clean, VOCAB)).abs().max().item())
        assert moved > 1e-3, name  # the members changed the distribution


def test_family_one_member_is_deterministic_and_plain(family):
    name, _, llm = family
    a = generate(llm, PROMPTS, None, max_tokens=STEPS, logprobs=5, detokenize=False)
    b = generate(llm, PROMPTS, {"roster_size": 1, "tau": 0.5}, max_tokens=STEPS, logprobs=5, detokenize=False)
    for x, y in zip(a, b):
        assert list(x.token_ids) == list(y.token_ids), name
        assert [{t: v.logprob for t, v in s.items()} for s in x.logprobs] == \
               [{t: v.logprob for t, v in s.items()} for s in y.logprobs], name
