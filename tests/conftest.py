"""Tiny random MoE models built from transformers config classes; nothing is downloaded."""

import pytest
import torch

torch.set_num_threads(2)


def tiny_olmoe(**overrides):
    from transformers import AutoModelForCausalLM, OlmoeConfig

    params = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=32, num_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                  eos_token_id=1, pad_token_id=0, bos_token_id=0)
    params.update(overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(OlmoeConfig(**params)).eval()


@pytest.fixture(scope="session")
def olmoe():
    return tiny_olmoe()


@pytest.fixture
def prompt_ids():
    return torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(7))
