"""The `roe` command line on a tiny checkpoint directory."""

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import roe
from roe.cli import build_parser, main


def run_json(capsys, argv):
    main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_prints_base_and_roe(capsys, saved_model):
    out = run_json(capsys, ["generate", "To be, or not to be", "--model", str(saved_model), "-K", "3",
                            "--tau", "0.5", "--max-new-tokens", "6", "--json"])
    model, tokenizer = roe.load(saved_model)
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out["base"] == tokenizer.decode(base[0, ids.shape[1]:], skip_special_tokens=True)
    with roe.roster(model, roe.RoEConfig(roster_size=3, tau=0.5)) as r:
        ours = r.generate(ids, max_new_tokens=6)
    assert out["roe"] == tokenizer.decode(ours[0, ids.shape[1]:], skip_special_tokens=True)
    assert out["schedule"] == [0.0, 0.5, 0.0]


@pytest.mark.parametrize("argv, message", [
    (["-K", "0"], "--roster-size must be >= 1"),
    (["--tau", "-1"], "tau must be finite and >= 0"),
    (["--schedule", "missing.json"], "schedule file not found"),
])
def test_generate_bad_input_is_a_clear_error(saved_model, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["generate", "hello", "--model", str(saved_model), *argv])


def test_help_comes_from_the_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "untouched model and with RoE" in capsys.readouterr().out


def test_eval_reports_paired_rows(capsys, saved_model, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    plot = tmp_path / "nll.png"
    out = run_json(capsys, ["eval", "--model", str(saved_model), "--text", str(text), "--ks", "1,3",
                            "--tau", "0.8", "--window", "16", "--max-windows", "6", "--json", "--plot", str(plot)])
    rows = {r["K"]: r for r in out["rows"]}
    assert rows[1]["delta_nll"] == 0.0 and rows[1]["delta_se"] == 0.0
    assert rows[3]["nll"] == pytest.approx(rows[1]["nll"] + rows[3]["delta_nll"])
    assert rows[3]["delta_nll"] != 0.0 and rows[3]["delta_se"] > 0
    assert out["conditions"]["windows"] == 6 and out["conditions"]["tokens"] == 6 * 16
    assert plot.stat().st_size > 1000


def test_eval_against_a_uniform_tau_is_paired(capsys, saved_model, tmp_path):
    """--against-tau scores a second temperature on the same windows and noise: against itself the
    paired difference is exactly zero; against another tau it equals the difference of the two
    runs' NLLs, each measured on its own."""
    text = tmp_path / "held_out.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    common = ["eval", "--model", str(saved_model), "--text", str(text), "--ks", "1,3", "--window", "16",
              "--max-windows", "6", "--json"]
    same = {r["K"]: r for r in run_json(capsys, [*common, "--tau", "0.8", "--against-tau", "0.8"])["rows"]}
    assert same[1]["against_nll"] is None
    assert same[3]["against_nll"] == same[3]["nll"] and same[3]["against_delta_nll"] == 0.0
    out = run_json(capsys, [*common, "--tau", "0.8", "--against-tau", "0.3"])
    assert out["conditions"]["against_tau"] == 0.3
    versus = {r["K"]: r for r in out["rows"]}
    alone = {r["K"]: r for r in run_json(capsys, [*common, "--tau", "0.3"])["rows"]}
    assert versus[3]["against_nll"] == pytest.approx(alone[3]["nll"], abs=1e-9)
    assert versus[3]["against_delta_nll"] == pytest.approx(versus[3]["nll"] - alone[3]["nll"], abs=1e-9)
    assert versus[3]["against_delta_nll"] != 0.0 and versus[3]["against_delta_se"] > 0
    with pytest.raises(SystemExit, match="tau must be finite"):
        main([*common, "--against-tau", "-1"])


def test_eval_against_a_schedule_file(capsys, saved_model, tmp_path):
    """--against-schedule FILE is the paired comparison with a schedule file: with the file of the
    same temperatures as --against-tau it gives the same rows; a schedule of another layer count
    is refused before any scoring; it cannot be combined with --against-tau."""
    from roe.schedule import Schedule

    text = tmp_path / "held_out.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    common = ["eval", "--model", str(saved_model), "--text", str(text), "--ks", "1,3", "--window", "16",
              "--max-windows", "6", "--tau", "0.8", "--json"]
    layers = len(roe.adapters.find_routers(roe.load(str(saved_model))[0]))
    same = tmp_path / "uniform_0.3.json"
    Schedule.uniform(0.3, layers).save(same)
    by_tau = run_json(capsys, [*common, "--against-tau", "0.3"])
    by_file = run_json(capsys, [*common, "--against-schedule", str(same)])
    assert by_file["rows"] == by_tau["rows"] and by_file["rows"][1]["against_delta_nll"] != 0.0
    assert by_file["conditions"]["against_schedule"] == str(same) and by_file["conditions"]["against_tau"] is None
    every = tmp_path / "every_layer.json"
    Schedule(tau=(0.3,) * layers, provenance={}).save(every)
    all_layers = run_json(capsys, [*common, "--against-schedule", str(every)])
    assert all_layers["rows"][1]["against_nll"] != by_tau["rows"][1]["against_nll"]
    wrong = tmp_path / "wrong.json"
    Schedule(tau=(0.3,) * (layers + 1), provenance={}).save(wrong)
    with pytest.raises(SystemExit, match="one tau per MoE layer|layers"):
        main([*common, "--against-schedule", str(wrong)])
    assert "K" not in capsys.readouterr().out  # refused before the table
    with pytest.raises(SystemExit, match="not both"):
        main([*common, "--against-tau", "0.3", "--against-schedule", str(same)])


@pytest.mark.parametrize("argv, message", [
    (["--text", "nope.txt"], "text file not found"),
    (["--ks", "0,2"], "roster sizes >= 1"),
    (["--window", "5000"], "fewer than one window"),
])
def test_eval_bad_input(saved_model, tmp_path, argv, message):
    text = tmp_path / "t.txt"
    text.write_text("short text " * 30)
    args = ["eval", "--model", str(saved_model), "--text", str(text), *argv]
    with pytest.raises(SystemExit, match=message):
        main(args)


def test_eval_empty_text_is_refused(saved_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SystemExit, match="is empty"):
        main(["eval", "--model", str(saved_model), "--text", str(empty)])


def test_bench_rows_for_every_method(capsys, saved_model, tmp_path):
    plot = tmp_path / "cost.png"
    out = run_json(capsys, ["bench", "--model", str(saved_model), "--ks", "1,4", "--prompt-tokens", "12",
                            "--new-tokens", "4", "--time-box", "5", "--repeats", "2", "--json", "--plot", str(plot)])
    rows = {(r["method"], r["K"]): r for r in out["rows"]}
    assert set(rows) == {(m, k) for m in ("roster", "separate", "batched-own-cache", "recompute") for k in (1, 4)}
    assert rows[("roster", 4)]["kv_bytes"] == rows[("roster", 1)]["kv_bytes"] > 0
    assert rows[("separate", 4)]["kv_bytes"] == 4 * rows[("separate", 1)]["kv_bytes"]
    assert rows[("batched-own-cache", 4)]["kv_bytes"] == 4 * rows[("batched-own-cache", 1)]["kv_bytes"]
    assert rows[("recompute", 4)]["kv_bytes"] == 0
    assert all(r["steps"] == 2 * 3 and r["decode_step_ms"] > 0 for r in out["rows"])
    assert out["conditions"]["repeats"] == 2
    assert plot.stat().st_size > 1000


def test_repeated_bench_pairs_ratios_within_rounds():
    """With --repeats, a ratio to K=1 is taken inside each round and then its median: a slow round
    (the machine busy for both) must not distort it the way a ratio of medians would."""
    from roe.bench import BenchRow, combine_rounds

    def row(K, ms, rss=100.0):
        return BenchRow(method="roster", K=K, decode_step_ms=ms, ttft_ms=2 * ms, tokens_per_s=1e3 / ms,
                        peak_rss_mb=rss, kv_bytes=10, steps=3)

    rounds = [[row(1, 10.0), row(8, 13.0, 110.0)], [row(1, 20.0), row(8, 22.0)], [row(1, 11.0), row(8, 13.2)]]
    k1, k8 = combine_rounds(rounds)
    assert k8["step_ratio"] == pytest.approx(1.2)  # median of 1.3, 1.1, 1.2
    assert k8["step_ratio_range"] == pytest.approx([1.1, 1.3])
    assert k8["step_ratio_ci95"] is None  # 3 rounds are too few for a 95% interval
    assert k8["decode_step_ms"] == 13.2 and k1["decode_step_ms"] == 11.0  # medians of the rounds
    assert k8["rss_ratio"] == pytest.approx(1.1) and k8["steps"] == 9 and k1["step_ratio"] == 1.0


def test_median_ci_uses_the_binomial_order_statistics():
    """The 95% interval of the median is (x_(j), x_(n+1-j)) as in the standard tables (n=6: 1 and 6,
    n=10: 2 and 9, n=25: 8 and 18); with 5 values no interval reaches 95%. Its coverage, checked by
    simulation on a skewed law, is at least 95% and the interval is not wider than needed."""
    import random

    from roe.bench import median_ci

    assert median_ci([float(i) for i in range(5)]) is None
    for n, (j, k) in {6: (1, 6), 10: (2, 9), 25: (8, 18)}.items():
        values = [10.0 * i for i in range(1, n + 1)]
        random.Random(n).shuffle(values)
        assert median_ci(values) == (10.0 * j, 10.0 * k)
    rng, true_median, hits = random.Random(0), 1.0, 0  # lognormal(0, 1) has median 1
    for _ in range(4000):
        low, high = median_ci([rng.lognormvariate(0, 1) for _ in range(12)])
        hits += low <= true_median <= high
    assert 0.95 <= hits / 4000 <= 0.995  # exact coverage for n=12 is 1 - 2 * 79 / 4096 = 0.961


def test_profile_splits_a_step_into_stages(saved_model):
    import roe
    from roe.bench import PROFILE_STAGES, profile_roster

    model, _ = roe.load(saved_model)
    prompt = torch.arange(3, 15)
    with roe.roster(model, roe.RoEConfig(roster_size=4, tau=0.5)) as r:
        prof = profile_roster(r, prompt, steps=3, top=5)
    assert prof["K"] == 4 and prof["step_ms_median"] > 0
    assert all(prof["shares"][s] > 0 for s in PROFILE_STAGES) and prof["shares"]["other"] >= -1e-6
    assert sum(prof["shares"].values()) == pytest.approx(1.0, abs=1e-3)
    assert len(prof["top_ops"]) == 5 and all(o["calls_per_step"] > 0 for o in prof["top_ops"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bench_baselines_compute_the_roster_step_until_their_histories_differ(olmoe, prompt_ids):
    """separate and batched-own-cache run the same members with the same noise as the roster: their
    first step (clean prefill history) equals the roster's. From the second step on, each member
    attends to its own noisy keys/values of the first, which is the cost model they stand for,
    not the roster's clean-history semantics, so their results differ there."""
    from roe.bench import METHODS

    prompt = prompt_ids[0]
    with roe.roster(olmoe, roe.RoEConfig(roster_size=4, tau=1.5, skip_first=0, skip_last=0, seed=3)) as r:
        steps = {}
        for name in ("roster", "separate", "batched-own-cache"):
            method = METHODS[name](r)
            first = method.start(prompt)
            steps[name] = (first, method.step(first.argmax()))
    for name in ("separate", "batched-own-cache"):
        torch.testing.assert_close(steps[name][0], steps["roster"][0], rtol=0, atol=1e-5)
        assert (steps[name][1] - steps["roster"][1]).abs().max() > 1e-4


def test_an_explicit_tau_wins_over_the_shipped_schedule(capsys):
    """On the embedded model (which ships a calibrated schedule) --tau used to be ignored: it must
    give the uniform schedule it names, and without it the shipped schedule is used."""
    from roe.loading import default_schedule_path
    from roe.schedule import Schedule

    common = ["generate", "To be", "-K", "2", "--max-new-tokens", "1", "--json"]
    assert run_json(capsys, [*common, "--tau", "0.5"])["schedule"] == [0.0, 0.5, 0.5, 0.5, 0.5, 0.0]
    assert run_json(capsys, common)["schedule"] == list(Schedule.load(default_schedule_path()).tau)


SMALL_RUNS = {"generate": ["hello", "--max-new-tokens", "1"],
              "eval": ["--ks", "1", "--window", "8", "--max-windows", "1"],
              "tasks": ["--items", "1", "--task", "last-word"],
              "bench": ["--ks", "1", "--methods", "roster", "--prompt-tokens", "4", "--new-tokens", "1"]}


@pytest.mark.parametrize("command", SMALL_RUNS)
@pytest.mark.parametrize("tau", ["-1", "nan", "inf"])
def test_a_bad_tau_is_a_usage_error_before_any_work(capsys, command, tau):
    argv = [command, *SMALL_RUNS[command], "--tau", tau]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"roe {command}: error: --tau must be finite and >= 0" in err or "argument --tau: invalid float" in err
    assert "Traceback" not in err


def test_the_default_schedule_of_a_checkpoint_directory(capsys, saved_model, tmp_path):
    """A checkpoint shipping a roe schedule.json uses it by default in every command; --tau and
    --schedule still win, and both together are refused."""
    import shutil

    from roe.schedule import Schedule

    model_dir = tmp_path / "with-schedule"
    shutil.copytree(saved_model, model_dir)
    Schedule(tau=(0.05, 0.3, 0.2)).save(model_dir / "schedule.json")
    common = ["generate", "To be", "--model", str(model_dir), "-K", "2", "--max-new-tokens", "2", "--json"]
    assert run_json(capsys, common)["schedule"] == [0.05, 0.3, 0.2]
    assert run_json(capsys, [*common, "--tau", "0.4"])["schedule"] == [0.0, 0.4, 0.0]
    assert run_json(capsys, ["generate", "To be", "--model", str(saved_model), "-K", "2", "--max-new-tokens", "2",
                             "--json"])["schedule"] == [0.0, 0.1, 0.0]
    with pytest.raises(SystemExit, match="not both"):
        main([*common, "--tau", "0.4", "--schedule", str(model_dir / "schedule.json")])


@pytest.mark.parametrize("argv, message", [
    (["generate", "To be", "--tau", "0.1", "--schedule", "s.json"], "give --tau or --schedule, not both"),
    (["eval", "--tau", "0.1", "--schedule", "s.json"], "give --tau or --schedule, not both"),
    (["eval", "--against-tau", "0.1", "--against-schedule", "s.json"], "not both"),
    (["bench", "--tau", "0.1", "--schedule", "s.json"], "give --tau or --schedule, not both"),
    (["tasks", "--tau", "0.1", "--schedule", "s.json"], "give --tau or --schedule, not both"),
])
def test_conflicting_temperatures_are_refused_before_the_model_is_loaded(capsys, tmp_path, argv, message):
    """Every command resolves --tau/--schedule the same way, before any work: a conflict is named even
    when the model cannot be loaded (eval and bench used to load the model first and report that)."""
    text = tmp_path / "t.txt"
    text.write_text("short text " * 30)
    err = usage_error(capsys, [*argv, "--model", str(tmp_path / "no-such-model"),
                               *(["--text", str(text)] if argv[0] in ("eval", "tasks") else [])])
    assert message in err and "no-such-model" not in err


def usage_error(capsys, argv) -> str:
    """Run the command; it must stop with exit status 2 and one error line, no traceback, no output."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and "Traceback" not in err and out == ""
    return err


def test_a_model_that_cannot_be_found_is_one_line(capsys, tmp_path, monkeypatch):
    """A missing local path used to give a 35-line 'Repo id must be in the form' traceback, and a
    hub id offline 50 s of retries and 81 lines."""
    import huggingface_hub
    import huggingface_hub.constants

    assert "model directory not found: ./no/such/dir" in usage_error(capsys, ["generate", "hi", "--model",
                                                                              "./no/such/dir"])
    assert "not a checkpoint directory (no config.json" in usage_error(capsys, ["generate", "hi", "--model",
                                                                                str(tmp_path)])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in usage_error(capsys, ["eval", "--model", "someorg/not-cached", "--text", "x"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    err = usage_error(capsys, ["generate", "hi", "--model", "someorg/not-cached"])
    assert "the hub cannot be reached (ConnectionError: Name or service not known)" in err


@pytest.mark.parametrize("option", ["--window", "--batch-size", "--max-windows"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_sizes_must_be_positive(capsys, saved_model, tmp_path, option, value):
    """--window 0 was a ZeroDivisionError, --max-windows 0 silently meant every window."""
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    err = usage_error(capsys, ["eval", "--model", str(saved_model), "--text", str(text), "--ks", "1",
                               "--window", "8", "--max-windows", "2", option, value])
    assert f"roe eval: error: {option} must be >= 1, got {value}" in err


def test_a_missing_plot_extra_is_refused_before_the_work(capsys, saved_model, tmp_path, monkeypatch):
    """It used to crash after the whole eval, losing the --json output."""
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as when the plot extra is not installed
    err = usage_error(capsys, ["eval", "--model", str(saved_model), "--text", str(text), "--ks", "1", "--window",
                               "8", "--max-windows", "2", "--json", "--plot", str(tmp_path / "p.png")])
    assert "--plot needs matplotlib: pip install 'roe[plot]'" in err
    err = usage_error(capsys, ["bench", "--model", str(saved_model), "--ks", "1", "--methods", "roster",
                               "--prompt-tokens", "4", "--new-tokens", "1", "--plot", str(tmp_path / "p.png")])
    assert "roe[plot]" in err


@pytest.mark.parametrize("argv, numbers", [
    (["generate", "hello", "--max-new-tokens", "300"], "the prompt (4 tokens) plus --max-new-tokens 300 = 304 tokens"),
    (["eval", "--window", "257", "--ks", "1"], "--window 257 = 257 tokens"),
    (["bench", "--prompt-tokens", "250", "--new-tokens", "10", "--ks", "1"], "= 260 tokens"),
    (["tasks", "--context-tokens", "300", "--items", "1", "--task", "next-line"], "--context-tokens 300"),
])
def test_work_longer_than_the_context_is_refused_with_the_numbers(capsys, saved_model, tmp_path, argv, numbers):
    """It used to print a transformers warning and run anyway past the model's 256 positions."""
    text = tmp_path / "t.txt"
    lines = [f"Line {i} of the play: to be, or not to be, that is the question {i}." for i in range(80)]
    text.write_text("\n".join(lines) + "\n\n\n" + "\n".join(reversed(lines)))
    extra = [] if argv[0] in ("generate", "bench") else ["--text", str(text)]
    err = usage_error(capsys, [*argv, "--model", str(saved_model), *extra])
    assert numbers in err and "exceeds the model's context of 256 tokens" in err


def test_help_shows_the_defaults_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "--window WINDOW" in out and "default: 256" in out and "default: the model's default schedule" in out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"roe {importlib.metadata.version('roe')}"


def test_every_json_flag_says_where_its_document_goes():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    with_json = [name for name, sub in commands.items() if "--json" in sub.format_help()]
    assert len(with_json) >= 5  # eval, tasks, bench, calibrate, models, generate
    for name in with_json:
        help_ = " ".join(commands[name].format_help().split())
        assert "as the last line of stdout" in help_, name


def test_python_m_roe_reports_a_usage_error_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "roe", "eval", "--window", "0"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(roe.__file__).parents[1])))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "roe eval: error: --window must be >= 1, got 0"
