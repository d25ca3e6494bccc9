"""Schedules (per-layer tau, JSON round trip, validation) and aggregators."""

import json

import pytest
import torch

from roe.aggregate import AGGREGATORS, aggregate
from roe.schedule import Schedule


def test_uniform_schedule_keeps_the_ends_clean():
    s = Schedule.uniform(0.3, 6, skip_first=2, skip_last=1)
    assert s.tau == (0.0, 0.0, 0.3, 0.3, 0.3, 0.0)
    assert Schedule.uniform(0.3, 2, skip_first=1, skip_last=1).is_clean
    with pytest.raises(ValueError, match="exceeds"):
        Schedule.uniform(0.3, 2, skip_first=2, skip_last=1)


def test_schedule_json_round_trip_and_validation(tmp_path):
    s = Schedule(tau=(0.0, 0.12, 0.05, 0.0), provenance={"model": "tiny", "K": 8})
    path = tmp_path / "s.json"
    s.save(path)
    loaded = Schedule.load(path)
    assert loaded == s and loaded.provenance == {"model": "tiny", "K": 8}
    path.write_text(json.dumps({"tau": [0.1]}))
    with pytest.raises(ValueError, match="not a roe schedule"):
        Schedule.load(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Schedule.load(path)
    with pytest.raises(ValueError, match="finite"):
        Schedule(tau=(0.1, float("inf")))
    with pytest.raises(TypeError):
        Schedule(tau=(0.1, "x"))
    with pytest.raises(ValueError, match="4 entries but the model has 3 MoE layers"):
        s.check_layers(3)


def test_mean_prob_is_the_log_of_averaged_probabilities():
    logprobs = torch.log_softmax(torch.randn(2, 5, 11), dim=-1)
    expected = logprobs.exp().mean(dim=1).log()
    torch.testing.assert_close(aggregate(logprobs, "mean-prob", dim=1), expected)


def test_mean_prob_of_one_member_is_its_log_probs_bit_for_bit():
    """The one-member shortcut (no logsumexp over a singleton axis) changes no bit, -inf and NaN included."""
    logprobs = torch.log_softmax(torch.randn(2, 1, 5, 11) * 30, dim=-1)
    logprobs[0, 0, 0, :3] = float("-inf")
    logprobs[1, 0, 1, 4] = float("nan")
    full = torch.logsumexp(logprobs, dim=1) - 0.0
    got = aggregate(logprobs, "mean-prob", dim=1)
    assert torch.equal(got.nan_to_num(nan=7.0), full.nan_to_num(nan=7.0)) and got.isnan().sum() == 1


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_identical_members_aggregate_to_one(name):
    one = torch.log_softmax(torch.randn(3, 17), dim=-1)
    many = one[:, None].expand(3, 6, 17)
    result = aggregate(many, name, dim=1)
    if name == "vote":
        assert torch.equal(result.argmax(-1), one.argmax(-1)) and torch.allclose(result.exp().sum(-1), torch.ones(3))
    else:
        torch.testing.assert_close(result, one, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_streaming_merge_equals_one_shot(name):
    logprobs = torch.log_softmax(torch.randn(4, 7, 13), dim=-1)
    agg = AGGREGATORS[name]
    state = agg.merge(agg.partial(logprobs[:, :3], 1), agg.partial(logprobs[:, 3:], 1))
    torch.testing.assert_close(agg.finish(state, 7), aggregate(logprobs, name, dim=1))


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_from_logits_equals_the_streaming_form(name):
    logits = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(4)) * 4
    want = aggregate(torch.log_softmax(logits, dim=-1), name, dim=1)
    torch.testing.assert_close(AGGREGATORS[name].from_logits(logits, dim=1), want, rtol=0, atol=1e-5)


def test_mean_prob_from_logits_stays_finite_where_every_member_underflows():
    logits = torch.zeros(1, 3, 6)
    logits[..., 0] = 200.0  # every other token's probability is exp(-200): below fp32's range
    got = AGGREGATORS["mean-prob"].from_logits(logits, dim=1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, aggregate(torch.log_softmax(logits, dim=-1), "mean-prob", dim=1))


def test_one_member_is_exactly_the_log_softmax():
    logits = torch.randn(2, 1, 40, generator=torch.Generator().manual_seed(5))
    assert torch.equal(AGGREGATORS["mean-prob"].from_logits(logits, dim=1), torch.log_softmax(logits, dim=-1)[:, 0])


def test_the_default_tau_is_the_schedule_shipped_with_the_model(tmp_path):
    """RoEConfig() means the model's default schedule: the roe schedule.json in the checkpoint
    directory when there is one, else uniform 0.1 with one clean MoE layer at each end; another
    tool's schedule.json is not ours and is ignored; an explicit tau always wins."""
    from transformers import AutoModelForCausalLM

    import roe
    from roe.roster import schedule_for
    from roe.schedule import model_default_schedule
    from tests.conftest import tiny_olmoe

    tiny_olmoe().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model_default_schedule(tmp_path) is None
    assert schedule_for(model, roe.RoEConfig()).tau == (0.0, 0.1, 0.0)
    shipped = Schedule(tau=(0.07, 0.21, 0.13), provenance={"model": "tiny"})
    shipped.save(tmp_path / "schedule.json")
    assert model_default_schedule(tmp_path) == shipped
    assert schedule_for(model, roe.RoEConfig()).tau == (0.07, 0.21, 0.13)
    assert schedule_for(model, roe.RoEConfig(tau=0.5)).tau == (0.0, 0.5, 0.0)
    with roe.roster(model, roe.RoEConfig(roster_size=2)) as r:
        assert r.tau_L == (0.07, 0.21, 0.13)
    assert roe.RoEConfig().schedule(3, model_default=shipped) == shipped
    assert roe.RoEConfig().schedule(4).tau == (0.0, 0.1, 0.1, 0.0)  # no shipped schedule: uniform 0.1
    (tmp_path / "schedule.json").write_text(json.dumps({"layers": [1, 2, 3]}))  # another tool's file
    assert schedule_for(model, roe.RoEConfig()).tau == (0.0, 0.1, 0.0)
    Schedule(tau=(0.1,) * 4).save(tmp_path / "schedule.json")  # ours, but for another layer count
    with pytest.raises(ValueError, match="4 entries but the model has 3"):
        schedule_for(model, roe.RoEConfig())


def test_the_embedded_model_ships_its_default_schedule():
    from roe.loading import DEFAULT_MODEL, default_schedule_path
    from roe.schedule import model_default_schedule

    assert model_default_schedule(DEFAULT_MODEL) == Schedule.load(default_schedule_path())
