"""benchmarks/frontier.py --sequence: best-of-N picks the most likely sample, majority vote counts
words, the recorded log-likelihoods are the model's, samples differ, and the phase resumes."""

import importlib.util
from pathlib import Path

import pytest
import torch

import roe
from roe.eval import tasks

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("frontier", ROOT / "benchmarks" / "frontier.py")
frontier = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(frontier)

pytestmark = pytest.mark.usefixtures("one_thread")

LINES = ["To be, or not to be, that is the question.", "In the beginning was the word of the people.",
         "The quick brown fox jumps over the lazy dog.", "Whether tis nobler in the mind to suffer.",
         "The slings and arrows of outrageous fortune.", "Or to take arms against a sea of troubles."]


def sample(word: str, *logprobs: float) -> dict:
    return {"word": word, "logprobs": list(logprobs)}


def test_best_of_n_picks_the_highest_total_likelihood():
    # "cat" has the best first token, "dog" the best mean log-prob, "fish" the best total: only the total counts
    samples = [sample("cat", -0.1, -5.0), sample("dog", -1.0, -1.0), sample("fish", -1.9), sample("cat", -9.0)]
    assert frontier.best_of_n(samples) == "fish"
    assert frontier.best_of_n(samples[:2]) == "dog"
    assert frontier.best_of_n([sample("owl", -1.0, -1.0), sample("bat", -2.0)]) == "owl"  # ties: the earliest


def test_majority_vote_counts_words():
    samples = [sample("dog", -0.1), sample("cat", -5.0), sample("cat", -6.0), sample("owl", -0.2)]
    assert frontier.majority_vote(samples) == "cat"  # 2 votes beat the likelier single ones
    assert frontier.majority_vote([sample("dog", -9.0), sample("cat", -1.0), sample("cat", -1.0),
                                   sample("dog", -1.0)]) == "dog"  # a tie: the word seen first
    assert frontier.majority_vote([sample("", -0.1), sample("", -0.1), sample("bird", -9.0)]) == "bird"
    assert frontier.majority_vote([sample("", -0.1), sample("", -0.2)]) == ""


def test_summary_scores_nested_samples_against_the_answers():
    answers = ["cat", "dog", "owl"]
    samples = [  # per item: 3 samples; N = 2 uses the first two of the same samples
        [sample("dog", -3.0), sample("cat", -1.0), sample("cat", -2.0)],  # N1 no, best2 yes, vote2 no (tie), 3 yes
        [sample("dog", -1.0), sample("cow", -0.5), sample("cow", -4.0)],  # N1 yes, best2 no, vote2 yes, 3 no
        [sample("owl", -5.0), sample("owl", -6.0), sample("bat", -0.1)],  # N1 yes, 2 yes, best3 no, vote3 yes
    ]
    seq = {"settings": {"samples": 3, "temperature": 0.7}, "items": [{"context": "", "answer": a} for a in answers],
           "cells": {**{f"greedy_K{K}": ["cat", "cow", "owl"] for K in frontier.SEQUENCE_ROSTERS},
                     **{f"sample_{j}": [samples[i][j] for i in range(3)] for j in range(3)}},
           "cost_rounds": [{"step_ms": {"greedy_K1": 10.0, "greedy_K2": 12.0, "samples_N1": 10.5, "samples_N2": 11.0,
                                        "samples_N3": 14.0}}]}
    section = frontier.sequence_summary(seq)
    correct = {r["point"]: r["correct"] for r in section["rows"]}
    assert correct == {"greedy_K1": 2, "greedy_K2": 2, "greedy_K4": 2, "greedy_K8": 2, "sample_N1": 2,
                       "best_of_N2": 2, "majority_N2": 2, "best_of_N3": 1, "majority_N3": 2}
    change = {r["point"]: r["change_vs_greedy_K1"] for r in section["rows"]}
    assert change["best_of_N3"] == pytest.approx(-1 / 3)
    (k2,) = [e for e in section["equal_cost"] if e["K"] == 2]  # cost 1.2: N = 2 batched (1.1) is affordable
    assert k2["batched"]["N"] == 2 and k2["sequential"]["N"] == 1
    assert [v["point"] for v in k2["batched"]["versus"]] == ["best_of_N2", "majority_N2"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("\n\n\n".join("\n".join(LINES[i:] + LINES[:i]) for i in range(len(LINES))))
    return path


def test_sequence_phase_on_a_tiny_model(saved_model, text_file, tmp_path):
    model, tokenizer = roe.load(saved_model)
    docs = tasks.read_documents(text_file)
    prompt_P = torch.tensor(tokenizer(LINES[0], add_special_tokens=False).input_ids[:8])
    out = tmp_path / "frontier.json"
    flags = ["--sequence", "--samples", "2", "--batch-size", "2", "--sequence-rounds", "1", "--new-tokens", "3",
             "--out", str(out)]
    doc = frontier.run_sequence(model, tokenizer, docs, frontier.parse_args([*flags, "--items", "3"]), out, "test",
                                prompt_P)
    seq = doc["sequence"]
    items = tasks.last_word_items(docs, tokenizer, 3, seed=0)
    with roe.roster(model, roe.RoEConfig(roster_size=1)) as r:
        assert seq["cells"]["greedy_K1"] == tasks.generated_words(r, tokenizer, items)
    with torch.no_grad():
        for i, item in enumerate(items):  # each sample's log-likelihood is the model's, teacher-forced
            for j in range(2):
                s = seq["cells"][f"sample_{j}"][i]
                ctx = tokenizer(item.context, add_special_tokens=False).input_ids
                logprobs = torch.log_softmax(model(torch.tensor([ctx + s["tokens"]])).logits[0].float(), -1)
                want = sum(float(logprobs[len(ctx) - 1 + t, tok]) for t, tok in enumerate(s["tokens"]))
                assert sum(s["logprobs"]) == pytest.approx(want, abs=1e-4) and len(s["tokens"]) > 0
    # samples are keyed by seed + n: two samples of the same item must not all coincide
    assert any(a["tokens"] != b["tokens"] for a, b in zip(*(seq["cells"][f"sample_{j}"] for j in range(2))))
    assert set(seq["cost_rounds"][0]["step_ms"]) == {"greedy_K1", "greedy_K2", "greedy_K4", "greedy_K8",
                                                     "samples_N1", "samples_N2"}
    assert doc["sequence_sampling"]["items"] == 3
    # resume: more items only add; the finished ones are kept as they were
    before = {c: list(v) for c, v in seq["cells"].items()}
    doc = frontier.run_sequence(model, tokenizer, docs, frontier.parse_args([*flags, "--items", "4"]), out, "test",
                                prompt_P)
    assert all(doc["sequence"]["cells"][c][:3] == v and len(doc["sequence"]["cells"][c]) == 4
               for c, v in before.items())
    assert len(doc["sequence"]["cost_rounds"]) == 1
    with pytest.raises(SystemExit, match="other settings"):
        frontier.run_sequence(model, tokenizer, docs, frontier.parse_args([*flags, "--temperature", "1.0"]), out,
                              "test", prompt_P)
