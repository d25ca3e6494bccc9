"""Iteration-level batching (roe/engine.py ``Decoding``): prompts join and leave a running batch
between decode steps, and every prompt still gets the tokens it gets alone.

The story these guard: ``roe serve`` once ran each batch to completion, so a 12-token request
waited a minute behind a long one. Scheduling by step lets the short one join the running
forward; that is only allowed if joining changes nobody's tokens: not the newcomer's (prefilled
alone, its own noise seed, its own sampling settings), not the running prompts' (re-padded
when a newcomer's history is longer, trimmed when a long one leaves).
"""

from dataclasses import replace

import pytest
import torch

import roe
from roe import families
from roe.engine import Decoding, Row, model_eos
from roe.stopping import StopConditions

NOISY = roe.RoEConfig(roster_size=4, tau=1.5, skip_first=0, skip_last=0, seed=3)
SAMPLED = dict(do_sample=True, temperature=1.3, top_p=0.9)


pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(n: int, seed: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def solo(model, cfg: roe.RoEConfig, row: Row) -> tuple[list[int], torch.Tensor]:
    """The tokens ``row`` gets from ``Roster.generate`` alone, with its seed as the roster's, and
    the log-probs [N, V] they were chosen from."""
    logprobs = []
    with roe.roster(model, replace(cfg, seed=row.seed)) as r:
        out = r.generate(row.prompt[None], max_new_tokens=row.stop.max_new_tokens, do_sample=row.do_sample,
                         temperature=row.temperature, top_p=row.top_p, on_step=lambda _, lp: logprobs.append(lp[0]))
    return out[0, len(row.prompt):len(row.prompt) + row.generated].tolist(), torch.stack(logprobs)[:row.generated]


def run(decoding: Decoding, steps: int, got: dict) -> None:
    """Up to ``steps`` steps; ``got[id(row)]`` collects each row's (token, log-probs [V])."""
    for _ in range(steps):
        if not decoding.rows:
            return
        step = decoding.step()
        for row, token, logprobs_V in zip(step.rows, step.tokens_R.tolist(), step.logprobs_RV, strict=True):
            got.setdefault(id(row), []).append((token, logprobs_V))


def assert_solo(model, cfg: roe.RoEConfig, rows: list[Row], got: dict) -> None:
    """Each row's tokens are its solo tokens, and its log-probs its solo log-probs: its own noise
    seed, not the roster's, keyed its routing (float rounding may differ with the batch)."""
    for i, row in enumerate(rows):
        tokens, logprobs_NV = solo(model, cfg, row)
        assert [t for t, _ in got[id(row)]] == tokens, i
        torch.testing.assert_close(torch.stack([lp for _, lp in got[id(row)]]), logprobs_NV, rtol=0, atol=1e-5)


def joining_run(model, cfg: roe.RoEConfig, vocab: int, eos: frozenset) -> tuple[list[Row], dict]:
    """A long greedy prompt runs; a longer sampled one, a shorter greedy one and a one-token sampled
    one join after 3 steps (other seeds); one more joins after the shorter one has left."""
    got: dict = {}
    long = Row(prompt(6, 0, vocab), seed=cfg.seed, stop=StopConditions(max_new_tokens=24, eos=eos))
    joiners = [Row(prompt(13, 1, vocab), seed=11, stop=StopConditions(max_new_tokens=10, eos=eos), **SAMPLED),
               Row(prompt(3, 2, vocab), seed=12, stop=StopConditions(max_new_tokens=4, eos=eos)),
               Row(prompt(1, 3, vocab), seed=cfg.seed, stop=StopConditions(max_new_tokens=12, eos=eos), **SAMPLED)]
    late = Row(prompt(9, 4, vocab), seed=13, stop=StopConditions(max_new_tokens=6, eos=eos))
    with torch.no_grad(), roe.roster(model, cfg) as r:
        decoding = Decoding(r)
        decoding.admit([long])
        run(decoding, 3, got)
        decoding.admit(joiners)
        run(decoding, 5, got)
        assert joiners[1].finish is not None and joiners[1] not in decoding.rows
        decoding.admit([late])
        run(decoding, 100, got)
    return [long, *joiners, late], got


@pytest.mark.parametrize("fan_out", [False, True])
def test_prompts_joining_mid_run_get_their_solo_tokens(olmoe, fan_out):
    """Both decode paths: every layer noisy (all K rows throughout), or the first layer clean
    (run once per prompt, then fanned out to the members)."""
    cfg = replace(NOISY, skip_first=1) if fan_out else NOISY
    with roe.roster(olmoe, cfg) as r:
        assert r.can_fan_out == fan_out
    rows, got = joining_run(olmoe, cfg, 128, model_eos(olmoe))
    assert all(row.finish in ("eos", "length") and len(got[id(row)]) == row.generated for row in rows)
    assert_solo(olmoe, cfg, rows, got)


def test_a_hybrid_model_batches_by_step_too():
    """Models that cannot fold (recurrent state) decode one forward per prompt; rows join and leave alike."""
    model = families.build("nemotron_h")
    cfg = roe.RoEConfig(roster_size=3, tau=1.0, skip_first=0, skip_last=0, seed=3)
    rows, got = joining_run(model, cfg, families.VOCAB, model_eos(model))
    assert_solo(model, cfg, rows, got)


def test_different_seeds_and_settings_share_one_forward(olmoe):
    """Rows of requests with other seeds and sampling settings run in the same model forward; the
    seeds really differ (same prompt, other seed, other tokens)."""
    calls = []
    handle = olmoe.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad(), roe.roster(olmoe, NOISY) as r:
            decoding = Decoding(r)
            eight = StopConditions(max_new_tokens=8)
            rows = decoding.admit([Row(prompt(5, 0), seed=seed, stop=eight, **SAMPLED) for seed in (1, 2, 3)]
                                  + [Row(prompt(7, 1), seed=4, stop=eight)])
            calls.clear()
            steps = list(decoding.steps())
    finally:
        handle.remove()
    assert len(calls) == len(steps) == 8
    tokens = [torch.stack([s.tokens_R[s.rows.index(row)] for s in steps]).tolist() for row in rows]
    assert len({tuple(t) for t in tokens[:3]}) == 3
    assert tokens[3] == solo(olmoe, NOISY, rows[3])[0]


def test_dropped_rows_stop_costing_compute(olmoe):
    """A dropped row leaves the next step's batch, and the padding only it needed goes with it."""
    with torch.no_grad(), roe.roster(olmoe, NOISY) as r:
        decoding = Decoding(r)
        long, short = decoding.admit([Row(prompt(30, 0), seed=3, stop=StopConditions(max_new_tokens=50)),
                                      Row(prompt(4, 1), seed=5, stop=StopConditions(max_new_tokens=50))])
        decoding.step()
        assert decoding.decoder.cache.layers[0].keys.shape[:3:2] == (2, 30)
        decoding.drop([long])
        step = decoding.step()
    assert step.rows == [short] and long.finish == "dropped" and long.generated == 1
    assert decoding.decoder.cache.layers[0].keys.shape[:3:2] == (1, 5)  # its 3 + 2 tokens, no padding


def test_rows_are_checked():
    with pytest.raises(ValueError, match="max_new_tokens"):
        Row(prompt(3, 0), seed=0, stop=StopConditions(max_new_tokens=0))
    with pytest.raises(ValueError, match="temperature"):
        Row(prompt(3, 0), seed=0, stop=StopConditions(max_new_tokens=2), do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="prompt"):
        Row(torch.zeros(0, dtype=torch.long), seed=0, stop=StopConditions(max_new_tokens=2))


def test_per_row_seeds_give_each_row_its_own_requests_noise():
    """One plan (or bank) over rows of several seeds gives each row exactly the noise a plan of its
    seed alone gives, and each prompt the sampling uniform of its seed."""
    from roe.routing import NoiseBank, NoisePlan, sampling_uniform

    tau_L = (0.0, 0.4, 0.7)
    seed_T = torch.tensor([3, 3, 9, 9, 1 << 40, 1 << 40])
    member_T = torch.tensor([0, 1, 0, 1, 0, 1])
    bank = NoiseBank(seed=3, members=2, ahead=4)
    for position in range(6):  # crosses the end of the bank's draws
        position_T = torch.tensor([position, position, position + 7, position + 7, 2, 2]) + position
        logits = torch.randn(6, 8)
        mixed = NoisePlan.for_rows(seed=seed_T, member_T=member_T, position_T=position_T, tau_L=tau_L)
        banked = NoisePlan.for_rows(seed=seed_T, member_T=member_T, position_T=position_T, tau_L=tau_L, bank=bank)
        for layer in (1, 2):
            alone = torch.cat([NoisePlan.for_rows(seed=int(seed_T[i]), member_T=member_T[i:i + 2],
                                                  position_T=position_T[i:i + 2], tau_L=tau_L).noise(layer, logits[:2])
                               for i in (0, 2, 4)])
            assert torch.equal(mixed.noise(layer, logits), alone)
            assert torch.equal(banked.noise(layer, logits), alone)
        assert not torch.equal(alone[1], alone[3])
    position_B = torch.tensor([5, 5, 8])
    uniform_B = sampling_uniform(torch.tensor([3, 4, 3]), position_B)
    assert all(uniform_B[b] == sampling_uniform(seed, position_B[b:b + 1])[0] for b, seed in enumerate((3, 4, 3)))
    assert uniform_B[0] != uniform_B[1]
