"""roster(): identities, restoration, validation, and agreement with the slow reference."""

import pytest
import torch

import roe
from roe import reference
from tests.conftest import tiny_olmoe

NOISY = dict(roster_size=4, tau=1.5, skip_first=0, skip_last=0, seed=3)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_k1_and_tau0_reproduce_the_model_exactly(olmoe, prompt_ids):
    expected_lp = torch.log_softmax(olmoe(prompt_ids).logits, dim=-1)
    expected_ids = olmoe.generate(prompt_ids, max_new_tokens=8, do_sample=False)
    for cfg in (roe.RoEConfig(roster_size=1, tau=2.0), roe.RoEConfig(roster_size=8, tau=0.0)):
        with roe.roster(olmoe, cfg) as r:
            assert torch.equal(r.score(prompt_ids), expected_lp)
            assert torch.equal(r.generate(prompt_ids, max_new_tokens=8), expected_ids)


def test_exit_restores_the_model_bit_for_bit(olmoe, prompt_ids):
    before_state, before_logits = state(olmoe), olmoe(prompt_ids).logits
    modules_before = dict(olmoe.named_modules())
    with pytest.raises(RuntimeError, match="boom"):
        with roe.roster(olmoe, roe.RoEConfig(**NOISY)) as r:
            r.score(prompt_ids)
            assert any("forward" in m.__dict__ for m in olmoe.modules())
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in olmoe.modules())
    assert dict(olmoe.named_modules()) == modules_before
    after = state(olmoe)
    assert before_state.keys() == after.keys() and all(torch.equal(before_state[k], after[k]) for k in after)
    assert torch.equal(olmoe(prompt_ids).logits, before_logits)


def test_noise_changes_the_prediction(olmoe, prompt_ids):
    with roe.roster(olmoe, roe.RoEConfig(**NOISY)) as r:
        noisy = r.score(prompt_ids)
    clean = torch.log_softmax(olmoe(prompt_ids).logits, dim=-1)
    assert (noisy - clean).abs().max() > 1e-3


def test_score_equals_the_stepwise_reference(olmoe, prompt_ids):
    with roe.roster(olmoe, roe.RoEConfig(**NOISY)) as r:
        fast = r.score(prompt_ids)[0]
        slow = reference.score(r, prompt_ids[0])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_generate_equals_the_reference(olmoe, prompt_ids):
    with roe.roster(olmoe, roe.RoEConfig(**NOISY)) as r:
        fast = r.generate(prompt_ids, max_new_tokens=8)[0]
        slow = reference.generate_greedy(r, prompt_ids[0], 8)
    assert torch.equal(fast, slow)


def test_same_seed_same_output_other_seed_differs(olmoe, prompt_ids):
    outs = []
    for seed in (3, 3, 4):
        with roe.roster(olmoe, roe.RoEConfig(**{**NOISY, "seed": seed})) as r:
            outs.append(r.score(prompt_ids))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_batched_prompts_match_their_solo_runs(olmoe):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 128, (n,), generator=gen) for n in (3, 9, 1, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    with roe.roster(olmoe, roe.RoEConfig(**NOISY)) as r:
        batched = r.generate(ids, attention_mask=mask, max_new_tokens=6)
        batched_lp = r.score(ids, attention_mask=mask)
        for b, p in enumerate(prompts):
            solo = r.generate(p[None], max_new_tokens=6)[0]
            assert torch.equal(batched[b, width:], solo[len(p):])
            torch.testing.assert_close(batched_lp[b, width - len(p):], r.score(p[None])[0], rtol=0, atol=1e-5)


def test_sampling_is_seeded_and_batch_invariant(olmoe, prompt_ids):
    cfg = roe.RoEConfig(**NOISY)
    with roe.roster(olmoe, cfg) as r:
        a = r.generate(prompt_ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9)
        b = r.generate(prompt_ids.repeat(3, 1), max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9)
        c = r.generate(prompt_ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9)
    assert all(torch.equal(a[0], row) for row in b) and torch.equal(a, c)
    with roe.roster(olmoe, roe.RoEConfig(**{**NOISY, "seed": 11})) as r:
        other = r.generate(prompt_ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9)
    assert not torch.equal(a, other)


def test_eos_stop_strings_and_streaming(olmoe, prompt_ids):
    with roe.roster(olmoe, roe.RoEConfig(**NOISY)) as r:
        free = r.generate(prompt_ids, max_new_tokens=8)
        eos = int(free[0, prompt_ids.shape[1] + 2])
        stopped = r.generate(prompt_ids, max_new_tokens=8, eos_token_id=eos)
        assert stopped.shape[1] <= prompt_ids.shape[1] + 3 and int(stopped[0, -1]) == eos
        seen = []
        r.generate(prompt_ids, max_new_tokens=5, callback=lambda t: seen.append(int(t[0])))
        assert seen == free[0, prompt_ids.shape[1]:prompt_ids.shape[1] + 5].tolist()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(roster_size=0), ValueError),
        (dict(roster_size=2.0), TypeError),
        (dict(tau=-0.1), ValueError),
        (dict(tau=float("nan")), ValueError),
        (dict(tau="nope.json"), FileNotFoundError),
        (dict(aggregator="median"), ValueError),
        (dict(skip_first=-1), ValueError),
    ],
)
def test_config_rejects_bad_values(kwargs, error):
    with pytest.raises(error):
        roe.RoEConfig(**kwargs)


def test_roster_rejects_models_and_schedules_it_cannot_use(olmoe):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16))
    with pytest.raises(ValueError, match="no MoE layer"):
        roe.roster(dense, roe.RoEConfig()).__enter__()
    with pytest.raises(TypeError, match="PreTrainedModel"):
        roe.roster(torch.nn.Linear(2, 2), roe.RoEConfig()).__enter__()
    with pytest.raises(ValueError, match="3 MoE layers"):
        roe.roster(olmoe, roe.RoEConfig(tau=[0.1, 0.2])).__enter__()
    with pytest.raises(ValueError, match="exceeds"):
        roe.roster(olmoe, roe.RoEConfig(skip_first=2, skip_last=2)).__enter__()
    with pytest.raises(TypeError, match="RoEConfig"):
        roe.roster(olmoe, {"roster_size": 2}).__enter__()
    assert not any("forward" in m.__dict__ for m in olmoe.modules())


def test_a_schedule_calibrated_for_another_model_is_refused(olmoe, tmp_path):
    """Same MoE layer count, other architecture: the fingerprint in the provenance catches it."""
    from roe.schedule import Schedule, model_fingerprint

    other = tiny_olmoe(hidden_size=48, num_experts=4)
    path = tmp_path / "other.json"
    Schedule(tau=(0.0, 0.2, 0.0), provenance={"model": "other", "fingerprint": model_fingerprint(other)}).save(path)
    with pytest.raises(ValueError, match="made for another model.*hidden_size 48 in the schedule vs 32"):
        roe.roster(olmoe, roe.RoEConfig(tau=str(path))).__enter__()
    assert not any("forward" in m.__dict__ for m in olmoe.modules())
    with roe.roster(other, roe.RoEConfig(tau=str(path), roster_size=2)) as r:
        assert r.schedule.tau == (0.0, 0.2, 0.0)


def test_generate_rejects_bad_inputs(olmoe, prompt_ids):
    with roe.roster(olmoe, roe.RoEConfig(**NOISY)) as r:
        with pytest.raises(TypeError):
            r.generate(prompt_ids.float())
        with pytest.raises(ValueError, match="left padding"):
            r.generate(prompt_ids, attention_mask=torch.tensor([[1] * 8 + [0]]))
        with pytest.raises(ValueError, match="max_new_tokens"):
            r.generate(prompt_ids, max_new_tokens=-1)
        with pytest.raises(ValueError, match="top_p"):
            r.generate(prompt_ids, do_sample=True, top_p=0.0)


def test_sliding_window_olmoe_like_mixtral_matches_reference():
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
        max_position_embeddings=256)).eval()
    ids = torch.randint(2, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    with roe.roster(model, roe.RoEConfig(**NOISY)) as r:
        torch.testing.assert_close(r.score(ids)[0], reference.score(r, ids[0]), rtol=0, atol=1e-5)
        assert torch.equal(r.generate(ids, max_new_tokens=8)[0], reference.generate_greedy(r, ids[0], 8))


def test_transformers_streamer_receives_prompt_then_each_token(olmoe, prompt_ids):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.ended = True

    streamer = Collect()
    with roe.roster(olmoe, roe.RoEConfig(**NOISY)) as r:
        out = r.generate(prompt_ids, max_new_tokens=5, streamer=streamer)
    assert streamer.ended and torch.equal(streamer.chunks[0], prompt_ids)
    assert torch.cat([c.reshape(-1) for c in streamer.chunks[1:]]).tolist() == out[0, prompt_ids.shape[1]:].tolist()


@pytest.mark.parametrize("aggregator", ["mean-prob", "mean-logprob"])
def test_target_logprobs_are_score_at_the_targets(olmoe, aggregator):
    """The perplexity path (no [B, S, V] aggregate for mean-prob) equals ``score`` at the given tokens,
    with left padding, for every member chunking."""
    import importlib

    roster_module = importlib.import_module("roe.roster")  # roe.roster is also the function
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 128, (2, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    targets = torch.randint(2, 128, (2, 40), generator=gen)
    cfg = roe.RoEConfig(roster_size=5, tau=1.0, skip_first=0, skip_last=0, aggregator=aggregator)
    with roe.roster(olmoe, cfg) as r:
        want = r.score(ids, mask).gather(-1, targets[..., None])[..., 0]
        for keys in (40, 10_000):  # one member per chunk (40 // 40 - 1 = 0 -> 1), or all four at once
            old = roster_module.FOLD_KEYS
            roster_module.FOLD_KEYS = keys
            try:
                got = r.target_logprobs(ids, targets, mask)
            finally:
                roster_module.FOLD_KEYS = old
            torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=0, atol=2e-5)
        with pytest.raises(ValueError, match="targets must be"):
            r.target_logprobs(ids, targets[:, :5], mask)


def test_a_roster_used_after_its_with_block_raises(olmoe, prompt_ids):
    """It used to return the untouched model's outputs silently once the block had ended."""
    with roe.roster(olmoe, roe.RoEConfig(**NOISY)) as r:
        inside = r.score(prompt_ids)
    for use in (lambda: r.generate(prompt_ids, max_new_tokens=2), lambda: r.score(prompt_ids),
                lambda: r.target_logprobs(prompt_ids, prompt_ids),
                lambda: r.forward(member_BQ=torch.ones_like(prompt_ids), position_BQ=torch.arange(9)[None],
                                  input_ids=prompt_ids)):
        with pytest.raises(RuntimeError, match="closed when its `with` block ended.*with roe.roster"):
            use()
    with pytest.raises(RuntimeError, match="opens once"):
        r.__enter__()
    assert not any("forward" in m.__dict__ for m in olmoe.modules())
    assert inside.shape == (1, 9, 128)


def test_a_roster_without_a_with_block_installs_for_each_call(olmoe, prompt_ids):
    """``r = roe.roster(model, cfg); r.generate(...)`` used to fail with an AttributeError of a
    generator context manager: it gives what the ``with`` block gives, and between calls the
    model is exactly as before."""
    cfg = roe.RoEConfig(**NOISY)
    with roe.roster(olmoe, cfg) as r:
        want_ids, want_lp = r.generate(prompt_ids, max_new_tokens=4), r.score(prompt_ids)
    r = roe.roster(olmoe, cfg)
    assert torch.equal(r.generate(prompt_ids, max_new_tokens=4), want_ids)
    assert not any("forward" in m.__dict__ for m in olmoe.modules())
    torch.testing.assert_close(r.score(prompt_ids), want_lp, rtol=0, atol=0)
    assert not any("forward" in m.__dict__ for m in olmoe.modules())
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.score(prompt_ids)
