"""Routers that route a token by the other tokens of the forward are refused, saying so (issue 18 item 9).

Doge's ``DogeCDMoE`` (``DogeForCausalLM`` with ``is_moe=True``, product-key experts) is the case in
transformers 5.23: its two product-key score sets for token t are halves of the router logits of
other tokens. Before, roe refused it with "no roe routing rule reproduces router DogeCDMoE", which
hid that no rule can exist; ``roe models`` did not list it at all. The tests pin the model's
behaviour that makes RoE impossible there, the row ``roe models`` prints, and that the refusal
comes from a measurement on the router's call, not from its class name.
"""

import types

import pytest
import torch
from conftest import tiny_olmoe

import roe
from roe import families
from roe.support import family_row, markdown_table

pytestmark = pytest.mark.usefixtures("one_thread")

MIXING = "routes each token by the other tokens of the forward"


@pytest.fixture(scope="module")
def doge():
    return families.build("doge")


def test_doge_product_keys_take_each_tokens_scores_from_other_tokens(doge):
    """DogeCDMoE views router_gate's [T, 2 * keys] output as [2, T, keys]: with T = 10 tokens, key set
    x of token 1 is the second half of token 0's logits, and key set y of token 0 is the first half of
    token 5's (flat offset T * keys). A per-token router would use token t's own two halves."""
    block = doge.model.layers[0].mlp
    keys = block.num_keys
    hidden_BSD = torch.randn(2, 5, families.HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, logits_2TK = block(hidden_BSD)
        gate_TG = block.router_gate(hidden_BSD).reshape(10, 2 * keys)
    assert logits_2TK.shape == (2, 10, keys)
    assert torch.equal(logits_2TK[0, 1], gate_TG[0, keys:])
    assert torch.equal(logits_2TK[1, 0], gate_TG[5, :keys])
    assert not torch.equal(logits_2TK[1, 0], gate_TG[0, keys:])


def test_the_untouched_doge_model_disagrees_with_itself(doge):
    """What RoE cannot reproduce: the model's full forward at position t differs from its forward on the
    prefix ending at t (the distribution generation uses), and a prompt's logits change with the other
    prompt of its batch. A router that routes per token shows neither."""
    gen = torch.Generator().manual_seed(0)
    prompt, other = (torch.randint(3, families.VOCAB, (1, 6), generator=gen) for _ in range(2))
    with torch.no_grad():
        full_SV = doge(prompt).logits[0]
        prefix_SV = torch.stack([doge(prompt[:, :t + 1]).logits[0, -1] for t in range(6)])
        batched_SV = doge(torch.cat([prompt, other])).logits[0]
    assert torch.equal(full_SV[-1], prefix_SV[-1])
    assert (full_SV[:-1] - prefix_SV[:-1]).abs().amax(-1).min() > 1e-3
    assert (batched_SV - full_SV).abs().max() > 1e-3


def test_roe_models_shows_why_doge_is_refused():
    """The `roe models` row: refused, its first sentence naming the router, the measured change and why."""
    row = family_row("doge")
    assert row["class"] == "DogeForCausalLM" and row["supported"] is False
    line = markdown_table([row]).splitlines()[2]  # what `roe models` prints for it
    assert line.startswith("| doge | `DogeForCausalLM` | refused | "
                           "DogeForCausalLM: router DogeCDMoE (model.layers.0.mlp) ")
    assert MIXING in line and "of its scale), so no per-token routing rule can reproduce it |" in line


def _rescaled(router, hidden_states):
    """Per token, but the weights are halved: no rule reproduces it, and no other token is involved."""
    logits_TE, weights_TA, idx_TA = type(router).forward(router, hidden_states)
    return logits_TE, weights_TA * 0.5, idx_TA


def _from_previous_token(router, hidden_states):
    """Selects token t's experts from token t - 1's logits (token 0: the last one's), as Doge does."""
    logits_TE, _, _ = type(router).forward(router, hidden_states)
    probs_TE = torch.softmax(logits_TE.roll(1, dims=0), dim=-1, dtype=torch.float)
    weights_TA, idx_TA = torch.topk(probs_TE, router.top_k, dim=-1)
    return logits_TE, weights_TA.to(logits_TE.dtype), idx_TA


@pytest.mark.parametrize(("forward", "reason"), [(_rescaled, "no roe routing rule reproduces router"),
                                                 (_from_previous_token, MIXING)])
def test_the_reason_is_measured_on_the_router_not_read_from_its_name(forward, reason):
    """Two OLMoE routers no rule reproduces: only the one that takes another token's logits is said to
    mix tokens; the one that only rescales its weights gets the plain refusal."""
    model = tiny_olmoe()
    for router in [m for m in model.modules() if type(m).__name__ == "OlmoeTopKRouter"]:
        router.forward = types.MethodType(forward, router)
    with pytest.raises(ValueError, match=reason) as err, roe.roster(model, roe.RoEConfig(roster_size=2, tau=0.5)):
        pass
    assert (MIXING in str(err.value)) == (forward is _from_previous_token)
