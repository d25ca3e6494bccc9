"""The equivalent-size family's driver (benchmarks/equivalent_size.py): commands, logs and recipe guard.

The family trains over several sessions, each re-running the same command; these tests make sure
that re-running continues the same runs with the same recipe and that the committed logs count
each step once.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from tools import train

SPEC = importlib.util.spec_from_file_location(
    "equivalent_size", Path(__file__).resolve().parents[1] / "benchmarks" / "equivalent_size.py")
es = sys.modules.setdefault(SPEC.name, importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(es)


@pytest.mark.parametrize("member", es.FAMILY, ids=lambda m: m.name)
def test_driver_command_line_gives_train_the_members_config(member, monkeypatch):
    seen = {}
    monkeypatch.setattr(train, "train", lambda cfg, data, tok, out, resume, init: seen.update(
        cfg=cfg, data=data, tok=tok, out=out, resume=resume, init=init) or True)
    monkeypatch.setattr(train.torch, "set_num_threads", lambda n: seen.update(threads=n))
    command = es.train_args(member, threads=1)
    assert command[1:3] == ["-m", "tools.train"]
    train.main(command[3:])
    assert seen["cfg"] == member.config()
    assert seen["cfg"].total_steps == es.TOTAL_STEPS and seen["resume"] and seen["init"] is None
    assert seen["out"] == es.RUNS / member.name and seen["tok"] == es.TOKENIZER and seen["threads"] == 1


def test_driver_command_runs_from_the_repository_root():
    """The child is launched as train_member launches it (cwd = the repository root): tools/ is not installed."""
    import subprocess

    command = es.train_args(es.FAMILY[0], threads=1)
    done = subprocess.run([*command[:3], "--help"], cwd=es.ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--total-steps" in done.stdout


def test_family_spans_half_to_twice_the_default_at_one_active_expert_fraction():
    from safetensors import safe_open

    counts = {m.name: es.parameter_counts(m) for m in es.FAMILY}
    with safe_open(es.TOKENIZER / "model.safetensors", "pt") as shipped:
        default = sum(math.prod(shipped.get_slice(name).get_shape()) for name in shipped.keys())
    assert counts["d256"]["params"] == default  # the 1x member is the shipped model's shape
    ratios = sorted(c["params"] / default for c in counts.values())
    assert ratios[0] <= 0.6 and ratios[-1] >= 2.0 and len(ratios) >= 4
    for c in counts.values():
        dense = c["params"] - c["expert_params"]
        assert c["active_params"] == dense + c["expert_params"] * 4 // 32


def test_resumed_log_counts_each_step_once(tmp_path, monkeypatch):
    monkeypatch.setattr(es, "RUNS", tmp_path)
    member = es.FAMILY[0]
    (tmp_path / member.name).mkdir()
    lines = [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0, "val_loss": 4.1}, {"step": 30, "loss": 3.9},
             # killed after step 30, resumed from the checkpoint of step 20: steps 21-30 again
             {"step": 30, "loss": 3.9}, {"step": 34, "loss": 3.8, "val_loss": 3.85}]
    (tmp_path / member.name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = es.run_records(member)
    assert [r["step"] for r in records] == [10, 20, 30, 34]
    assert records[1]["val_loss"] == 4.1 and not es.finished(member)


def test_a_run_started_with_another_recipe_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(es, "RUNS", tmp_path)
    member = es.FAMILY[0]
    es.check_recipe(member)
    es.check_recipe(member)  # the same recipe: continues
    recipe = tmp_path / member.name / "recipe.json"
    recipe.write_text(json.dumps({**json.loads(recipe.read_text()), "total_steps": es.TOTAL_STEPS // 2}))
    with pytest.raises(SystemExit, match="total_steps"):
        es.check_recipe(member)


def test_a_second_seed_is_the_same_recipe_in_its_own_run(tmp_path, monkeypatch):
    """``train --seed 1``: the member's recipe with only the seed changed, in runs/seed1/<member>, its log in
    <member>-seed1.json, so it never resumes, or overwrites, the family's own run of that size."""
    from dataclasses import asdict, replace

    monkeypatch.setattr(es, "RUNS", tmp_path / "runs" / "family")
    monkeypatch.setattr(es, "RESULTS", tmp_path / "results")
    member = es.FAMILY[-1]
    again = replace(member, seed=1)
    first, second = asdict(member.config()), asdict(again.config())
    assert {k for k in first if first[k] != second[k]} == {"seed"} and second["seed"] == 1
    assert again.run_dir == tmp_path / "runs" / "seed1" / member.name and member.run_dir != again.run_dir
    command = es.train_args(again, threads=1)
    assert command[command.index("--out") + 1] == str(again.run_dir)
    assert command[command.index("--seed") + 1] == "1"
    again.run_dir.mkdir(parents=True)
    (again.run_dir / "log.jsonl").write_text(json.dumps({"step": 10, "min": 0.5, "tokens": 40960, "loss": 5.0}) + "\n")
    doc = es.export(again, threads=1)
    assert doc["seed"] == 1 and doc["steps_done"] == 10
    assert json.loads((tmp_path / "results" / f"{member.name}-seed1.json").read_text()) == doc
    assert not (tmp_path / "results" / f"{member.name}.json").exists()
