"""`roe tasks` on the tiny checkpoint: deterministic items, K=1 equals the plain model, lm-eval export."""

import json

import pytest
import torch
import yaml

import roe
from roe.cli import main
from roe.eval import tasks
from roe.schedule import Schedule

LINES = ["To be, or not to be, that is the question.", "In the beginning was the word of the people.",
         "The quick brown fox jumps over the lazy dog.", "Whether tis nobler in the mind to suffer.",
         "The slings and arrows of outrageous fortune.", "Or to take arms against a sea of troubles."]


@pytest.fixture
def text_file(tmp_path):
    docs = ["\n".join(LINES[i:] + LINES[:i]) for i in range(len(LINES))]
    path = tmp_path / "test.txt"
    path.write_text("\n\n\n".join(docs))
    return path


def test_items_are_deterministic_and_well_formed(saved_model, text_file):
    _, tokenizer = roe.load(saved_model)
    docs = tasks.read_documents(text_file)
    first = tasks.next_line_items(docs, tokenizer, 10, seed=3)
    assert first == tasks.next_line_items(docs, tokenizer, 10, seed=3) and len(first) == 10
    for item in first:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4 and item.context.endswith("\n")
    words = tasks.last_word_items(docs, tokenizer, 10, seed=3)
    assert len(words) == 10 and all(len(w.answer) >= 4 and w.answer.isalpha() for w in words)
    assert tasks.first_word(" question. And") == "question" and tasks.first_word("\nword") == ""


def test_k1_accuracy_equals_the_plain_model(saved_model, text_file):
    model, tokenizer = roe.load(saved_model)
    items = tasks.next_line_items(tasks.read_documents(text_file), tokenizer, 4, seed=0)
    got = tasks.correct(model, tokenizer, "next-line", items, roe.RoEConfig(roster_size=1))
    want = []
    with torch.no_grad():
        for item in items:
            scores = []
            for choice in item.choices:
                ctx, cont = tasks.encode_pair(tokenizer, item.context, choice)
                logprobs = torch.log_softmax(model(torch.tensor([ctx + cont]), use_cache=False).logits[0].float(), -1)
                scores.append(float(logprobs[len(ctx) - 1 : -1].gather(-1, torch.tensor(cont)[:, None]).sum()))
            want.append(max(range(4), key=scores.__getitem__) == item.answer)
    assert got == want


def test_statistics():
    low, high = tasks.wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    counts = tasks.mcnemar([True, True, False, False], [True, False, True, True])
    assert counts == {"both_right": 1, "base_only": 1, "roe_only": 2, "both_wrong": 0, "p_value": 1.0}


def test_tasks_command_reports_and_exports(capsys, saved_model, text_file, tmp_path):
    main(["tasks", "--model", str(saved_model), "--text", str(text_file), "-K", "3", "--tau", "0.5",
          "--items", "6", "--export", str(tmp_path / "lm_eval"), "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["task"], r["model"]): r for r in out["rows"]}
    assert set(rows) == {("next-line", "base"), ("next-line", "roe K=3"), ("last-word", "base"),
                         ("last-word", "roe K=3")}
    roe_row = rows[("next-line", "roe K=3")]
    assert roe_row["items"] == 6 and roe_row["ci_low"] <= roe_row["accuracy"] <= roe_row["ci_high"]
    assert sum(roe_row[k] for k in ("both_right", "base_only", "roe_only", "both_wrong")) == 6
    for name in ("roe_next_line", "roe_last_word"):
        config = yaml.safe_load((tmp_path / "lm_eval" / f"{name}.yaml").read_text())
        assert config["task"] == name
        lines = (tmp_path / "lm_eval" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 6 and "context" in json.loads(lines[0])
    assert config["output_type"] == "generate_until" and config["generation_kwargs"]["until"] == ["\n"]


def test_tasks_bad_input_is_a_clear_error(saved_model, text_file):
    with pytest.raises(SystemExit, match="--task must be"):
        main(["tasks", "--model", str(saved_model), "--text", str(text_file), "--task", "hellaswag"])
    with pytest.raises(SystemExit, match="has 2 entries but the model has 3"):
        main(["tasks", "--model", str(saved_model), "--text", str(text_file), "--items", "2", "--schedule",
              str(_schedule(text_file.parent))])


def _schedule(directory):
    path = directory / "short.json"
    Schedule(tau=(0.0, 0.1)).save(path)
    return path


def _offline_task_manager(export, tmp_path, monkeypatch):
    """lm-eval's task manager on the exported directory only, offline, with a fresh datasets cache."""
    import datasets.config
    import huggingface_hub.constants
    from lm_eval.tasks import TaskManager

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return TaskManager(include_path=str(export), include_defaults=False)


def test_lm_eval_asks_the_exported_items_as_roe_does(saved_model, text_file, tmp_path, monkeypatch):
    """The exported YAMLs, run by the real lm-eval with a scripted LM (no model): it asks exactly roe's
    (context, candidate) pairs and last-word prompts (stop at a newline, 6 tokens), and its first-word
    filter and metrics turn the scripted answers into what ``tasks.first_word`` and argmax give."""
    import lm_eval
    from lm_eval.api.model import LM

    _, tokenizer = roe.load(saved_model)
    docs = tasks.read_documents(text_file)
    mc_items = tasks.next_line_items(docs, tokenizer, 6, seed=1)
    word_items = tasks.last_word_items(docs, tokenizer, 6, seed=1)
    export = tmp_path / "lm_eval"
    tasks.export_lm_eval(export, mc_items, word_items)
    # per item in turn: a wrong word, the right word after a tab, no word
    replies = [(f" {w.answer}s, then", f"\t{w.answer} and", "\n")[i % 3] for i, w in enumerate(word_items)]

    class Scripted(LM):
        def __init__(self):
            super().__init__()
            self.asked = {"loglikelihood": [], "generate_until": []}

        def loglikelihood(self, requests):  # the longest candidate wins
            self.asked["loglikelihood"] += [r.args for r in requests]
            return [(float(len(r.args[1])), False) for r in requests]

        def generate_until(self, requests):
            self.asked["generate_until"] += [r.args for r in requests]
            return [replies[[w.context for w in word_items].index(r.args[0])] for r in requests]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    lm = Scripted()
    out = lm_eval.simple_evaluate(model=lm, tasks=["roe_next_line", "roe_last_word"], log_samples=False,
                                  task_manager=_offline_task_manager(export, tmp_path, monkeypatch))
    assert sorted(lm.asked["loglikelihood"]) == sorted((it.context, c) for it in mc_items for c in it.choices)
    assert sorted(a[0] for a in lm.asked["generate_until"]) == sorted(w.context for w in word_items)
    assert all(a[1]["until"] == ["\n"] and a[1]["max_gen_toks"] == 6 for a in lm.asked["generate_until"])
    longest = [max(range(len(it.choices)), key=lambda j, it=it: len(it.choices[j])) == it.answer for it in mc_items]
    assert out["results"]["roe_next_line"]["acc,none"] == pytest.approx(sum(longest) / len(mc_items))
    words = [tasks.first_word(reply) == w.answer for reply, w in zip(replies, word_items, strict=True)]
    assert sum(words) == 2 and out["results"]["roe_last_word"]["exact_match,first-word"] == pytest.approx(2 / 6)


# Slow (about 3 minutes on the shared 2-core machine: `roe tasks` plus two lm-eval runs of the real model).
# The default suite covers its parts faster: test_lm_eval_asks_the_exported_items_as_roe_does (lm-eval runs
# the export: roe's requests, filter and metrics), tests/test_lm_eval.py::test_noisy_loglikelihoods_are_roster_scores
# and ::test_noisy_generation_is_roster_generate (the ``roe`` lm-eval model answers what the roster computes),
# ::test_k1_is_exactly_lm_evals_hf (K = 1), and test_k1_accuracy_equals_the_plain_model.
@pytest.mark.slow
def test_lm_eval_reproduces_the_builtin_tasks(capsys, saved_model, text_file, tmp_path, monkeypatch):
    """The exported tasks, run by the real lm-eval with the ``roe`` model, give `roe tasks`' numbers:
    the same accuracies and, item for item, the same candidate log-likelihoods and generated words,
    for the untouched model (roster_size=1) and for RoE."""
    import lm_eval  # the dev install has it: missing is a failure, not a skip

    from roe.lm_eval import RoELM

    export = tmp_path / "lm_eval"
    main(["tasks", "--model", str(saved_model), "--text", str(text_file), "-K", "3", "--tau", "0.5",
          "--items", "8", "--export", str(export), "--json"])
    ours = {(r["task"], r["model"]): r["accuracy"] for r in
            json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    mc_items = [tasks.ChoiceItem(**json.loads(line)) for line in (export / "roe_next_line.jsonl").open()]
    word_items = [tasks.WordItem(**json.loads(line)) for line in (export / "roe_last_word.jsonl").open()]
    manager = _offline_task_manager(export, tmp_path, monkeypatch)
    model, tokenizer = roe.load(saved_model)
    for label, settings in (("base", dict(roster_size=1, tau=0.0)), ("roe K=3", dict(roster_size=3, tau=0.5))):
        lm = RoELM(pretrained=saved_model, batch_size=4, **settings)
        out = lm_eval.simple_evaluate(model=lm, tasks=["roe_next_line", "roe_last_word"], task_manager=manager,
                                      log_samples=True)
        assert out["results"]["roe_next_line"]["acc,none"] == pytest.approx(ours[("next-line", label)], abs=1e-9)
        assert out["results"]["roe_last_word"]["exact_match,first-word"] == pytest.approx(
            ours[("last-word", label)], abs=1e-9)
        mc = sorted(out["samples"]["roe_next_line"], key=lambda s: s["doc_id"])
        words = sorted(out["samples"]["roe_last_word"], key=lambda s: s["doc_id"])
        with roe.roster(model, roe.RoEConfig(**settings)) as r:
            for sample, item in zip(mc, mc_items, strict=True):
                theirs = [resp[0][0] for resp in sample["resps"]]
                assert theirs == pytest.approx(tasks.choice_scores(r, tokenizer, item), abs=1e-4), label
            ours_words = tasks.generated_words(r, tokenizer, word_items)
            contexts = [torch.tensor([tokenizer(it.context, add_special_tokens=False).input_ids]) for it in word_items]
            raw = [tokenizer.decode(r.generate(ids, max_new_tokens=6)[0, -6:], skip_special_tokens=True).split("\n")[0]
                   for ids in contexts]
        assert [s["resps"][0][0] for s in words] == raw, label  # the raw generations (discriminative)
        assert [s["filtered_resps"][0] for s in words] == [w or "[invalid]" for w in ours_words], label
