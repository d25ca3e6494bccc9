"""Every MoE family of transformers 5.23 (roe/families.py): the fast paths agree with the slow reference.

Per family: a tiny random model (routing biases non-zero), K = 3, tau = 1 on every MoE layer.
``score`` equals ``reference.score`` and greedy ``generate`` equals ``reference.generate_greedy``;
the noise really changes the routing (the roster's log-probs differ from the clean model's); and
the routing rule the self-test picks is the one the family's router implements. A family roe
cannot support exactly is refused with a clear error.
"""

import pytest
import torch

import roe
from roe import families, reference

NOISY = roe.RoEConfig(roster_size=3, tau=1.0, skip_first=0, skip_last=0)

# The oracle: the routing-rule class of each family, read off its transformers router code by hand
# (independent of roe's self-test, which picks the rule that reproduces the router):
#   S1 softmax->topk (+renorm flag/always/never)  S1g Gemma4  S1d DBRX (routing in DbrxFFN)
#   T1 topk(logits)->softmax over k  T1l Llama4 dense sigmoid  T1o JetMoe old-style dispatch tuple
#   G DeepSeek-V3 sigmoid+bias+groups  B score+bias without groups  S2 softmax+bias choice
#   S3 softmax+group limit (no bias)  P PhiMoE sparsemixer  I Inkling  Z Zaya
RULE = {
    **dict.fromkeys(("olmoe", "flex_olmo", "mixtral", "minimax", "qwen2_moe", "qwen3_moe", "qwen3_next",
                     "qwen3_5_moe", "qwen4_exp", "mellum", "hunyuan_v1_moe", "jamba"), "S1"),
    "gemma4": "S1g",
    "dbrx": "S1d",
    **dict.fromkeys(("gpt_oss", "granitemoe", "granitemoeshared", "granitemoe_swa", "granitemoehybrid", "aria",
                     "cohere2_moe"), "T1"),
    "llama4": "T1l",
    "jetmoe": "T1o",
    **dict.fromkeys(("deepseek_v3", "deepseek_v32", "glm_moe_dsa", "axk1", "axk2", "glm4_moe", "glm4_moe_lite",
                     "dots1", "dots3_note", "exaone_moe", "hy_v4", "kimi_linear", "bailing_hybrid", "mimo_v2_flash",
                     "nemotron_h", "solar_open", "beam"), "G"),
    **dict.fromkeys(("minimax_m2", "minimax_m3_vl", "hy_v3", "afmoe", "lfm2_moe", "laguna", "deepseek_v4",
                     "inkling2", "flint", "kolibri1"), "B"),
    **dict.fromkeys(("ernie4_5_moe", "longcat_flash"), "S2"),
    **dict.fromkeys(("deepseek_v2", "mistral4"), "S3"),
    "phimoe": "P",
    "inkling": "I",
    "zaya": "Z",
}

# The roe rule each routing-rule id of ``RULE`` must resolve to.
RULE_NAMES = {
    "S1": "softmax-topk", "S1g": "probs-topk", "T1": "topk-softmax", "T1l": "topk-dense-sigmoid",
    "T1o": "topk-softmax-dispatch", "G": "sigmoid-bias-groups", "B": "sigmoid-bias", "S2": "softmax-bias",
    "S3": "softmax-groups", "P": "sparsemixer", "I": "sigmoid-bias-shared", "Z": "softmax-bias-skip",
}
RULE_EXCEPTIONS = {"kolibri1": "logit-bias"}  # B, but the bias is added to the logits

# Families refused with a clear error, and the reason the message must give.
REFUSED = {"dbrx": "returns only its logits", "doge": "routes each token by the other tokens of the forward"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def prompt():
    return torch.randint(3, families.VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", [n for n in families.FAMILIES if n not in REFUSED])
def test_family_matches_reference(name, prompt):
    model = families.build(name)
    with torch.no_grad():
        clean_SV = torch.log_softmax(model(prompt).logits[0].float(), dim=-1)
    with roe.roster(model, NOISY) as r:
        expected_rule = RULE_EXCEPTIONS.get(name, RULE_NAMES[RULE[name]])
        assert {slot.rule.name for slot in r.slots} == {expected_rule}
        score_SV = r.score(prompt)[0]
        torch.testing.assert_close(score_SV, reference.score(r, prompt[0]), rtol=0, atol=1e-5)
        assert (score_SV - clean_SV).abs().max() > 1e-4, "tau = 1 changed no expert selection"
        assert torch.equal(r.generate(prompt, max_new_tokens=4)[0], reference.generate_greedy(r, prompt[0], 4))


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_family_raises_a_clear_error(name):
    model = families.build(name)
    with pytest.raises(ValueError, match=REFUSED[name]) as err, roe.roster(model, NOISY):
        pass
    assert type(model).__name__ in str(err.value)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_hash_routed_layers_stay_clean():
    """DeepSeek-V4: the hash-routed layer (experts fixed by token id) is not a roster layer."""
    model = families.build("deepseek_v4")
    hash_routers = [m for m in model.modules() if hasattr(m, "tid2eid")]
    assert len(hash_routers) == 1
    with roe.roster(model, NOISY) as r:
        assert len(r.slots) == 2
        assert all(not hasattr(slot.module, "tid2eid") for slot in r.slots)
        assert "forward" not in hash_routers[0].__dict__


PREFIX_CLEAN = roe.RoEConfig(roster_size=3, tau=1.0, skip_first=1, skip_last=0)


@pytest.mark.parametrize("name", [n for n in families.FAMILIES if n not in REFUSED])
def test_fan_out_of_the_clean_prefix_equals_the_full_roster(name):
    """Running the layers before the first noisy router once per prompt changes nothing.

    Two prompts of different lengths (left padding), 4 decode steps: the decode step that fans
    out at the first noisy layer gives the log-probs of the step that runs all K rows throughout.
    """
    from roe.engine import FoldedDecoder

    model = families.build(name)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, families.VOCAB, (n,), generator=gen) for n in (5, 3)]
    with roe.roster(model, PREFIX_CLEAN) as r:
        if r.strategy != "fold" or r.clean_prefix is None:
            # Hybrids never fold; a family whose first noisy router sits in decoder layer 0 (JetMoe:
            # attention routers too) has no clean prefix. Either way the plain step must be used.
            noisy_path = next(s.path for s, t in zip(r.slots, r.tau_L, strict=True) if t > 0)
            assert r.strategy == "expand" or ".0." in f".{noisy_path}.", (name, noisy_path)
            assert not r.can_fan_out
            return
        assert r.clean_prefix[1] >= 1
        assert r.can_fan_out, f"{name}: the query axes of the layer inputs were not found"
        # the first noisy layer's attention runs once too, except where the MoE block
        # is not a module of its own (Gemma 4: the decoder layer calls its router itself)
        assert r.fan_out_point == ("layer" if name == "gemma4" else "block"), (name, r.fan_out_point)
        fast, full = FoldedDecoder(r, rows), FoldedDecoder(r, rows, fan_out=False)
        tokens, pos = torch.stack([row[-1] for row in rows]), torch.tensor([len(row) - 1 for row in rows])
        for _ in range(4):
            with torch.no_grad():
                got, want = fast.step(tokens, pos), full.step(tokens, pos)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            tokens, pos = want.argmax(-1), pos + 1
