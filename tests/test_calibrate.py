"""`roe calibrate` on the tiny checkpoint: a valid schedule file, skips, bounds, provenance, uniform baseline."""

import json

import pytest

from roe.cli import main
from roe.schedule import Schedule


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "validation.txt"
    path.write_text("To be, or not to be, that is the question. In the beginning was the word. " * 12)
    return path


def test_calibrate_writes_a_schedule_no_worse_than_uniform(capsys, saved_model, text_file, tmp_path):
    out, plot = tmp_path / "schedule.json", tmp_path / "calibrate.png"
    main(["calibrate", "--model", str(saved_model), "--text", str(text_file), "-K", "3", "--trials", "4",
          "--tau-max", "0.8", "--skip-first", "1", "--skip-last", "0", "--window", "16", "--max-windows", "4",
          "--uniform", "--grid", "0,0.4,0.8", "--out", str(out), "--plot", str(plot), "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    schedule = Schedule.load(out)
    assert schedule.num_layers == 3 and schedule.tau[0] == 0.0
    assert all(0.0 <= t <= 0.8 for t in schedule.tau)
    prov = schedule.provenance
    for key in ("model", "data", "windows", "tokens", "K", "objective", "trials", "best_value", "base_value",
                "best_uniform_tau", "best_uniform_value", "date", "versions", "seed"):
        assert key in prov, key
    assert prov["K"] == 3 and prov["objective"] == "validation_nll" and prov["windows"] == 4
    assert "optuna" in prov["versions"]
    # no worse than uniform because the best uniform point is TPE's first trial (best <= it then holds)
    assert result["trial_values"][0] == prov["best_uniform_value"]
    assert prov["best_value"] <= prov["best_uniform_value"]
    assert result["tau"] == list(schedule.tau) and len(result["trial_values"]) == 4
    assert [u["tau"] for u in result["uniform"]] == [0.0, 0.4, 0.8]
    assert result["uniform"][0]["nll"] == pytest.approx(prov["base_value"])
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["-K", "0"], "roster-size must be >= 1"),
    (["--tau-max", "0"], "tau-max must be finite and > 0"),
    (["--trials", "0"], "trials must be >= 1"),
    (["--skip-first", "2", "--skip-last", "1"], "leaves none of the 3 MoE layers"),
    (["--window", "5000"], "fewer than one window"),
    (["--uniform", "--grid", "0,0.5"], "must lie in"),
])
def test_calibrate_bad_input_is_a_clear_error(saved_model, text_file, tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["calibrate", "--model", str(saved_model), "--text", str(text_file), "--out",
              str(tmp_path / "s.json"), *argv])


def test_calibrate_with_model_needs_text(saved_model):
    with pytest.raises(SystemExit, match="--text FILE is required"):
        main(["calibrate", "--model", str(saved_model)])
