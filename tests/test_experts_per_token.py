"""The sparsity dial: ``RoEConfig(experts_per_token=k)`` equals the model built with that k.

Per family of roe/families.py (8 experts, the model's own k = 2): the same weights loaded into
the model built with ``num_experts_per_tok = k`` (or the family's own field: ``moe_topk`` for
Aria, ``top_k_experts`` for Gemma4) are the ground truth. At K = 1, tau = 0 the dialled model's
log-probs equal it bit for bit and differ from the undialled model's; in a noisy roster (K = 3,
tau = 1) the dialled roster equals the roster of the rebuilt model bit for bit (score and greedy
generate) and agrees with the slow reference. The model's own k changes nothing. Families whose
model fixes k are refused, naming the family and the reason.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import roe
from roe import families, reference
from roe.adapters.base import outputs_equal

OWN_K = families.TOP_K
K_FIELDS = ("num_experts_per_tok", "moe_topk", "top_k_experts")  # where each family's config keeps k

# Families whose model fixes k, and the reason the refusal must give.
REFUSED = {
    "phimoe": "always picks exactly 2 experts",
    "jetmoe": "MoA attention",
    "zaya": "one expert per token only",
    "deepseek_v4": "hash-routed MoE layers",
}
# roe refuses these whatever k (tests/test_families.py), and k values the model itself cannot run.
UNSUPPORTED = {"dbrx", "doge"}
FAILS_IN_TRANSFORMERS = {"longcat_flash": 1}  # LongcatFlashExperts squeezes away the k axis at k = 1
DIALLED = [n for n in families.FAMILIES if n not in REFUSED and n not in UNSUPPORTED]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def prompt():
    return torch.randint(3, families.VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))


def build_with_k(name: str, k: int, like: torch.nn.Module) -> torch.nn.Module:
    """The family's model built with k experts per token, holding ``like``'s weights (strict load)."""
    cfg = families.FAMILIES[name]()
    field = next(f for f in K_FIELDS if getattr(cfg, f, None) == OWN_K)
    setattr(cfg, field, k)
    cfg._attn_implementation = like.config._attn_implementation
    direct = families.causal_lm_class(name)
    if direct is not None:
        model = direct._from_config(cfg, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(like.state_dict(), strict=True)
    return model.eval()


def clean(k: int | None) -> roe.RoEConfig:
    return roe.RoEConfig(roster_size=1, tau=0.0, experts_per_token=k)


def noisy(k: int | None) -> roe.RoEConfig:
    return roe.RoEConfig(roster_size=3, tau=1.0, skip_first=0, skip_last=0, experts_per_token=k)


@pytest.mark.parametrize(("name", "k"), [(name, k) for name in DIALLED for k in (1, 3)
                                         if FAILS_IN_TRANSFORMERS.get(name) != k])  # those: refused, tested below
def test_dial_equals_the_model_built_with_k(name, k, prompt):
    model = families.build(name)
    rebuilt = build_with_k(name, k, model)
    with torch.no_grad():
        want_SV = torch.log_softmax(rebuilt(prompt).logits[0].float(), dim=-1)
        own_SV = torch.log_softmax(model(prompt).logits[0].float(), dim=-1)
    with roe.roster(model, clean(k)) as r:
        assert all(slot.dialled and slot.rule.k(slot.module) == k for slot in r.slots)
        got_SV = r.score(prompt)[0]
    torch.testing.assert_close(got_SV, want_SV, rtol=0, atol=0)
    assert (got_SV - own_SV).abs().max() > 1e-5, f"experts_per_token={k} changed nothing"
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_kolibri1_gates_the_gathered_logits_call_by_call(k):
    """Kolibri1's router takes the sigmoid of the gathered [T, k] logits. The CPU sigmoid gives a
    tensor's tail elements (numel mod 2 vector widths) the scalar loop, which differs from the
    vectorised body in the last bit, so sigmoid-then-gather broke bit-exactness for a few calls
    in a hundred on one machine and not another. 5 tokens: the [5, k] weights are all tail, the
    [5, 8] scores are not; many calls make a last-bit difference certain to show."""
    model = families.build("kolibri1")
    rebuilt = build_with_k("kolibri1", k, model) if k != OWN_K else model
    with roe.roster(model, clean(k)) as r:
        slot = r.slots[0]
    router, want_router = slot.module, rebuilt.get_submodule(slot.path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(200):
            hidden_TD = 10 * torch.randn(5, model.config.hidden_size, generator=gen)
            output = router(hidden_TD)
            got = slot.rule.reroute(router, output, torch.zeros_like(output[0]), False, (hidden_TD,), {})
            assert outputs_equal(got, want_router(hidden_TD))


@pytest.mark.parametrize("name", DIALLED)
def test_dial_in_a_noisy_roster_equals_the_roster_of_the_model_built_with_k(name, prompt):
    model = families.build(name)
    rebuilt = build_with_k(name, 3, model)
    with roe.roster(rebuilt, noisy(None)) as r:
        want_SV = r.score(prompt)[0]
        want_ids = r.generate(prompt, max_new_tokens=4)
    with roe.roster(model, noisy(3)) as r:
        score_SV = r.score(prompt)[0]
        torch.testing.assert_close(score_SV, want_SV, rtol=0, atol=0)
        assert torch.equal(r.generate(prompt, max_new_tokens=4), want_ids)
        torch.testing.assert_close(score_SV, reference.score(r, prompt[0]), rtol=0, atol=1e-5)
        assert torch.equal(r.generate(prompt, max_new_tokens=4)[0], reference.generate_greedy(r, prompt[0], 4))
    with roe.roster(model, noisy(None)) as r:
        assert (r.score(prompt)[0] - score_SV).abs().max() > 1e-5, "experts_per_token=3 changed nothing"


@pytest.mark.parametrize("name", ["olmoe", "gpt_oss", "gemma4", "deepseek_v3", "phimoe", "jetmoe", "deepseek_v4"])
def test_the_models_own_k_changes_nothing(name, prompt):
    """experts_per_token = the model's k: no router is dialled and the output is bit for bit the default's
    (K = 1, tau = 0: the untouched model; and in a noisy roster), also for families that fix k."""
    model = families.build(name)
    with torch.no_grad():
        own_SV = torch.log_softmax(model(prompt).logits[0].float(), dim=-1)
        own_ids = model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    with roe.roster(model, clean(OWN_K)) as r:
        assert not any(slot.dialled for slot in r.slots)
        torch.testing.assert_close(r.score(prompt)[0], own_SV, rtol=0, atol=0)
        assert torch.equal(r.generate(prompt, max_new_tokens=4), own_ids)
    with roe.roster(model, noisy(None)) as r:
        default_SV = r.score(prompt)[0]
    with roe.roster(model, noisy(OWN_K)) as r:
        torch.testing.assert_close(r.score(prompt)[0], default_SV, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_family_whose_model_fixes_k_is_refused(name):
    model = families.build(name)
    with pytest.raises(ValueError, match=REFUSED[name]) as err:
        roe.roster(model, noisy(3))
    assert type(model).__name__ in str(err.value) and "experts_per_token=3" in str(err.value)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("name", list(FAILS_IN_TRANSFORMERS))
def test_a_k_the_model_cannot_run_is_refused(name, prompt):
    """The model built with that k fails in transformers itself; the roster refuses it up front."""
    k = FAILS_IN_TRANSFORMERS[name]
    model = families.build(name)
    with pytest.raises((ValueError, RuntimeError)), torch.no_grad():
        build_with_k(name, k, model)(prompt)
    with pytest.raises(ValueError, match=f"does not run with experts_per_token={k}") as err:
        roe.roster(model, clean(k))
    assert type(model).__name__ in str(err.value)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError), (2.0, TypeError),
                                              (True, TypeError), ("2", TypeError)])
def test_config_rejects_bad_experts_per_token(value, error):
    with pytest.raises(error, match="experts_per_token"):
        roe.RoEConfig(experts_per_token=value)


def test_more_experts_than_the_model_has_is_refused(olmoe):
    with pytest.raises(ValueError, match=r"experts_per_token=9 exceeds the 8 experts of OlmoeForCausalLM"):
        roe.roster(olmoe, roe.RoEConfig(experts_per_token=9))
    with roe.roster(olmoe, roe.RoEConfig(roster_size=2, tau=0.5, experts_per_token=8)) as r:
        assert all(slot.rule.k(slot.module) == 8 for slot in r.slots)


def test_batched_prompts_with_the_dial_match_their_solo_runs(olmoe):
    prompts = [torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 7)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    with roe.roster(olmoe, roe.RoEConfig(roster_size=4, tau=0.5, experts_per_token=1)) as r:
        batched = r.generate(ids, attention_mask=mask, max_new_tokens=5)
        for b, p in enumerate(prompts):
            solo = r.generate(p[None], max_new_tokens=5)[0]
            assert torch.equal(batched[b, width - len(p):], solo)


# ----------------------------------------------------------------- the command line: --experts-per-token


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoint directories of the same tiny OLMoE weights: built with k = 2 and with k = 1.

    The expert and router weights are scaled by 8 so that the experts decide the greedy tokens of
    this tiny random model (at their initial scale, no k changes a token).
    """
    from tests.conftest import tiny_olmoe, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id)
    model = tiny_olmoe(**ids)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name or name.endswith("mlp.gate.weight"):
                param.mul_(8)
    rebuilt = tiny_olmoe(**ids, num_experts_per_tok=1)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    return (_save(model, tokenizer, tmp_path_factory.mktemp("olmoe-k2")),
            _save(rebuilt, tokenizer, tmp_path_factory.mktemp("olmoe-k1")))


def run_json(capsys, argv):
    from roe.cli import main

    main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_option_equals_the_checkpoint_built_with_k(capsys, checkpoints):
    saved_model, saved_k1 = checkpoints
    common = ["To be, or not to be", "-K", "1", "--tau", "0", "--max-new-tokens", "8", "--json"]
    dialled = run_json(capsys, ["generate", "--model", str(saved_model), "--experts-per-token", "1", *common])
    rebuilt = run_json(capsys, ["generate", "--model", str(saved_k1), *common])
    assert dialled["roe"] == rebuilt["base"] == rebuilt["roe"]
    assert dialled["base"] != dialled["roe"], "k = 1 changed no generated token of the tiny model"
    assert dialled["experts_per_token"] == 1


def test_eval_option_is_paired_at_k_and_equals_the_checkpoint_built_with_k(capsys, checkpoints, tmp_path):
    saved_model, saved_k1 = checkpoints
    text = tmp_path / "held_out.txt"
    text.write_text("To be, or not to be, that is the question. In the beginning was the word. " * 20)
    common = ["--text", str(text), "--ks", "1,3", "--tau", "0.8", "--window", "16", "--max-windows", "4", "--json"]
    dialled = run_json(capsys, ["eval", "--model", str(saved_model), "--experts-per-token", "1", *common])
    rebuilt = run_json(capsys, ["eval", "--model", str(saved_k1), *common])
    own = run_json(capsys, ["eval", "--model", str(saved_model), *common])
    for got, want in zip(dialled["rows"], rebuilt["rows"], strict=True):
        # K = 1: a roster forward against the plain model's own forward (same ops): 1e-6 on a mean NLL
        assert got["nll"] == pytest.approx(want["nll"], rel=0, abs=1e-6)
    assert abs(dialled["rows"][0]["nll"] - own["rows"][0]["nll"]) > 1e-4
    assert dialled["conditions"]["experts_per_token"] == 1


def test_tasks_option_runs_both_rows_at_k(capsys, checkpoints, tmp_path):
    saved_model, saved_k1 = checkpoints
    from tests.test_tasks import LINES

    text = tmp_path / "test.txt"
    text.write_text("\n\n\n".join("\n".join(LINES[i:] + LINES[:i]) for i in range(len(LINES))))
    common = ["--text", str(text), "-K", "2", "--tau", "0.5", "--items", "4", "--task", "next-line", "--json"]
    dialled = run_json(capsys, ["tasks", "--model", str(saved_model), "--experts-per-token", "1", *common])
    rebuilt = run_json(capsys, ["tasks", "--model", str(saved_k1), *common])
    strip = ("model",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in dialled["rows"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in rebuilt["rows"]]
    assert dialled["conditions"]["experts_per_token"] == 1


@pytest.mark.parametrize("command", [["generate", "hello"], ["eval"], ["tasks"], ["bench"]])
def test_a_bad_experts_per_token_is_a_usage_error(capsys, saved_model, command):
    from roe.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--model", str(saved_model), "--experts-per-token", "0"])
    assert exit_info.value.code == 2
    assert "--experts-per-token must be >= 1" in capsys.readouterr().err


def test_bench_option_reaches_the_roster(capsys, saved_model):
    from roe.cli import main

    with pytest.raises(SystemExit, match="experts_per_token=9 exceeds the 8 experts"):
        main(["bench", "--model", str(saved_model), "--ks", "1", "--methods", "roster", "--prompt-tokens", "4",
              "--new-tokens", "2", "--time-box", "1", "--experts-per-token", "9"])
    out = run_json(capsys, ["bench", "--model", str(saved_model), "--ks", "1,2", "--methods", "roster",
                            "--prompt-tokens", "4", "--new-tokens", "2", "--time-box", "1",
                            "--experts-per-token", "1", "--json"])
    assert out["conditions"]["experts_per_token"] == 1 and [r["K"] for r in out["rows"]] == [1, 2]


def test_a_dialled_roster_does_not_share_the_model_with_another(olmoe, prompt):
    """Open rosters wrap each other's routers; a dialled one would re-select the other's clean rows too."""
    with roe.roster(olmoe, noisy(None)), pytest.raises(RuntimeError, match="together with another roster"):
        roe.roster(olmoe, clean(1))
    with roe.roster(olmoe, clean(1)):
        with pytest.raises(RuntimeError, match="together with another roster"), roe.roster(olmoe, noisy(None)):
            pass
    with roe.roster(olmoe, noisy(None)) as first, roe.roster(olmoe, noisy(None)):  # undialled rosters still stack
        assert first.score(prompt).shape[-1] == olmoe.config.vocab_size
    assert not any("forward" in m.__dict__ for m in olmoe.modules())
