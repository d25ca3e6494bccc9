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
