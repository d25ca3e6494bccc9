"""benchmarks/phds_eval.py: the dial's NLL and cross-sparsity agreement against models computed by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.conftest import tiny_olmoe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import phds_eval  # noqa: E402


def by_hand(model, windows_NW):
    """Per-window NLL [N] and greedy tokens [N, W] from the model's own forward."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=windows_NW[:, :-1]).logits.float(), dim=-1)
    nll = -logprobs.gather(-1, windows_NW[:, 1:, None])[..., 0].double().mean(dim=1)
    return nll, logprobs.argmax(dim=-1)


def test_rows_match_the_models_built_with_each_k():
    base = tiny_olmoe()  # k = 2 of 8 experts
    tuned = tiny_olmoe()
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    windows_NW = torch.randint(2, 128, (5, 17), generator=torch.Generator().manual_seed(1))
    doc = phds_eval.evaluate({"base": base, "tuned": tuned}, [1, 2, 4], 2, windows_NW, batch_size=2)
    rows = {(r["model"], r["k"]): r for r in doc["rows"]}

    want = {}
    for label, model in (("base", base), ("tuned", tuned)):
        for k in (1, 2, 4):
            built = tiny_olmoe(num_experts_per_tok=k)  # the same weights in the model built with k
            built.load_state_dict(model.state_dict())
            want[(label, k)] = by_hand(built, windows_NW)
    for (label, k), (nll, greedy) in want.items():
        row = rows[(label, k)]
        assert abs(row["nll"] - float(nll.mean())) < 1e-5
        delta_same = nll - want[("base", k)][0]
        assert abs(row["vs_base_same_k"]["delta"] - float(delta_same.mean())) < 1e-5
        assert abs(row["vs_base_own_k"]["delta"] - float((nll - want[("base", 2)][0]).mean())) < 1e-5
        agree = float((greedy == want[(label, 2)][1]).double().mean())
        assert abs(row["agreement"] - agree) < 1e-12
    # the perturbation and the dial really move things, so the checks above are not vacuous
    assert abs(rows[("tuned", 2)]["vs_base_same_k"]["delta"]) > 1e-4
    assert rows[("base", 1)]["agreement"] < 1.0
    assert rows[("base", 2)]["agreement"] == 1.0 and rows[("base", 2)]["vs_base_same_k"]["se"] == 0.0


def test_vs_same_k_pairs_every_fine_tune_against_the_others():
    base, tuned, other = tiny_olmoe(), tiny_olmoe(), tiny_olmoe()
    with torch.no_grad():
        for seed, model in ((1, tuned), (2, other)):
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed * 1000 + p.numel())))
    windows_NW = torch.randint(2, 128, (4, 17), generator=torch.Generator().manual_seed(3))
    doc = phds_eval.evaluate({"base": base, "tuned": tuned, "other": other}, [1, 2], 2, windows_NW, batch_size=2)
    rows = {(r["model"], r["k"]): r for r in doc["rows"]}
    for k in (1, 2):
        assert set(rows[("tuned", k)]["vs_same_k"]) == {"other"} and rows[("base", k)]["vs_same_k"].keys() == {
            "tuned", "other"}
        want = rows[("tuned", k)]["nll"] - rows[("other", k)]["nll"]  # the mean of paired deltas
        assert abs(rows[("tuned", k)]["vs_same_k"]["other"]["delta"] - want) < 1e-9
        assert rows[("tuned", k)]["vs_same_k"]["other"]["se"] > 0


def test_tasks_are_scored_at_each_k_and_paired_against_the_base(monkeypatch):
    """Each (model, k) is scored with the dial set to k (None at the own k), K = 1, and paired per item."""
    from roe.eval import tasks

    seen = []

    def fake_correct(model, tokenizer, task, items, cfg, batch_size=8, progress=None):
        seen.append((model, task, cfg.roster_size, cfg.experts_per_token))
        k = cfg.experts_per_token or 2
        shift = 1 if model is tuned else 0  # the tuned model is right on other items than the base
        return [(i + k + shift) % 3 == 0 for i in range(len(items))]

    monkeypatch.setattr(tasks, "correct", fake_correct)
    base, tuned = tiny_olmoe(), tiny_olmoe()
    items = {"next-line": list(range(9)), "last-word": list(range(6))}
    windows_NW = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    doc = phds_eval.evaluate({"base": base, "tuned": tuned}, [1, 2], 2, windows_NW, 2, ("tokenizer", items))
    assert {(m is tuned, *c) for m, *c in seen} == {
        (t, task, 1, k) for t in (False, True) for task in items for k in (1, None)}
    rows = {(r["model"], r["k"]): r["tasks"] for r in doc["rows"]}
    for k in (1, 2):
        for task, task_items in items.items():
            want_base = [(i + k) % 3 == 0 for i in range(len(task_items))]
            want_tuned = [(i + k + 1) % 3 == 0 for i in range(len(task_items))]
            assert rows[("base", k)][task]["accuracy"] == sum(want_base) / len(want_base)
            paired = rows[("tuned", k)][task]["vs_base_same_k"]
            assert paired["base_only"] == sum(want_base) and paired["roe_only"] == sum(want_tuned)
            assert paired["both_right"] == 0 and rows[("base", k)][task]["vs_base_same_k"]["base_only"] == 0
            lo, hi = rows[("tuned", k)][task]["wilson95"]
            assert lo < rows[("tuned", k)][task]["accuracy"] < hi
