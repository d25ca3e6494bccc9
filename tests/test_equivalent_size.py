"""Equivalent size (issue 20 items 2-4, 6): evaluate, fit, latency and report on a tiny family.

The family's real members take hours to train; these tests write tiny random members as
tools.train checkpoints in a temporary directory, run the commands on them end to end, and test
the fit on synthetic per-window NLLs whose true curve is known.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import equivalent_size_fit as fit
from benchmarks import equivalent_size_measure as measure

SPEC = importlib.util.spec_from_file_location(
    "equivalent_size", Path(__file__).resolve().parents[1] / "benchmarks" / "equivalent_size.py")
es = sys.modules.setdefault(SPEC.name, importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(es)

SIZES = np.array([5.0, 10.5, 17.9, 27.3, 38.6]) * 1e6  # the family's total parameters, roughly


# -- the fit, on synthetic NLLs -------------------------------------------------------------------

def synthetic(seed: int, *, a=5.0, b=-0.15, true_size=25e6, windows=200, window_sd=0.5, noise=0.05) -> fit.Series:
    """Per-window NLLs of 5 members on a known line a + b log(x / x_1x), plus an RoE point whose NLL
    is the line's at ``true_size``; every series shares the windows' difficulty (as real text does)."""
    rng = np.random.default_rng(seed)
    window_N = rng.normal(0, window_sd, windows)
    line_M = a + b * np.log(SIZES / SIZES[2])
    nll_MN = line_M[:, None] + window_N[None] + rng.normal(0, noise, (5, windows))
    roe_N = a + b * math.log(true_size / SIZES[2]) + window_N + rng.normal(0, noise, windows)
    return fit.Series(members=[f"m{i}" for i in range(5)], sizes={"params": SIZES, "active_params": SIZES / 3},
                      nll_MN=nll_MN, roe_ks=[1, 8], roe_KN=np.stack([nll_MN[2], roe_N]), one_x="m2")


def test_log_linear_fit_recovers_the_line():
    out = fit.fit_axis(synthetic(0, a=4.2, b=-0.11), "params", resamples=200)
    line = out["curves"]["log-linear"]
    assert line["params"]["a"] == pytest.approx(4.2, abs=0.01) and line["params"]["b"] == pytest.approx(-0.11, abs=0.01)
    assert line["params_ci95"]["b"][0] < -0.11 < line["params_ci95"]["b"][1]
    assert out["chosen"] == "log-linear"  # 3 parameters on 5 points must earn their keep


def test_power_law_fit_recovers_a_saturating_curve():
    u_M = np.log(np.geomspace(1e6, 1e9, 6) / 1e6)
    y_M = 2.0 + 3.0 * np.exp(-0.3 * u_M)  # E + A (x / x_ref)^-alpha
    theta = fit.PowerLaw.fit(u_M, y_M[None])[0]
    assert theta == pytest.approx([2.0, 3.0, 0.3], rel=0.03)
    line = fit.LogLinear.fit(u_M, y_M[None])
    assert ((fit.LogLinear.predict(line, u_M)[0] - y_M) ** 2).sum() > 100 * (
        (fit.PowerLaw.predict(theta[None], u_M)[0] - y_M) ** 2).sum()


def test_bootstrap_interval_covers_the_true_equivalent_size():
    covered, widths = 0, []
    for seed in range(40):
        point = fit.fit_axis(synthetic(seed), "params", resamples=300, seed=seed)["curves"]["log-linear"]["points"][1]
        covered += point["ci95"][0] <= 25e6 <= point["ci95"][1]
        widths.append((point["ci95"][1] - point["ci95"][0]) / 25e6)
    assert covered >= 32  # nominal 95%: 38 of 40; the percentile bootstrap runs a little under
    assert np.median(widths) < 0.3  # and the interval is informative, not [0, inf]


def test_equivalent_size_is_monotone_in_nll():
    series = synthetic(1)
    u_M = np.log(SIZES / SIZES[2])
    y_P = np.linspace(4.5, 5.5, 101)
    for curve in fit.CURVES.values():
        theta = curve.fit(u_M, series.nll_MN.mean(axis=1)[None])
        u_P = curve.inverse(theta, y_P[None])[0]
        finite = np.isfinite(u_P)
        assert finite.sum() > 50, curve.name
        assert np.all(np.diff(u_P[finite]) < 0), curve.name  # a lower NLL is a larger model
        assert not np.any(finite[:-1] & ~finite[1:])  # unreachable (inf) only at the low-NLL end


def test_points_beyond_the_measured_sizes_are_flagged_as_extrapolation():
    inside = fit.fit_axis(synthetic(2, true_size=25e6), "params", resamples=100)["curves"]["log-linear"]["points"][1]
    beyond = fit.fit_axis(synthetic(2, true_size=80e6), "params", resamples=100)["curves"]["log-linear"]["points"][1]
    assert not inside["extrapolated"] and inside["ci_within_measured"]
    assert beyond["extrapolated"] and not beyond["ci_within_measured"] and beyond["equivalent"] > SIZES.max()


def test_bootstrap_resamples_the_same_windows_for_every_series():
    """An RoE point 0.003 nats better than the 1x member on every window, on text whose windows vary by
    1 nat: paired, its place relative to the 1x is known to within a few percent; resampled
    independently (windows misaligned), the window-to-window spread would swamp it."""
    series = synthetic(3, window_sd=1.0, noise=0.001)
    better_N = series.nll_MN[2] - 0.003

    def ratio_width(roe_N):
        paired_ = fit.Series(**{**series.__dict__, "roe_KN": np.stack([series.nll_MN[2], roe_N])})
        point = fit.fit_axis(paired_, "params", resamples=300)["curves"]["log-linear"]["points"][1]
        return point["ratio_to_1x_ci95"][1] / point["ratio_to_1x_ci95"][0]

    assert ratio_width(better_N) < 1.05
    assert ratio_width(better_N[np.random.default_rng(0).permutation(200)]) > 2  # misaligned: what the check guards


# -- the commands, on a tiny family of tools.train checkpoints -----------------------------------

MEMBERS = {"t32": 32, "t48": 48, "t64": 64}


def write_member(runs: Path, name: str, hidden: int, vocab: int, *, finished: bool = True, seed: int | None = None):
    """A tools.train checkpoint of a tiny OLMoE (random weights, the step budget marked spent or not)."""
    from tools import train

    cfg = train.TrainConfig(preset="e32k4", hidden_size=hidden, num_layers=2, num_heads=2, intermediate_size=8,
                            seq_len=16, batch_size=2, total_steps=2, seed=hidden if seed is None else seed)
    model = train.build_model(cfg, vocab_size=vocab, eos_id=0)
    (runs / name).mkdir(parents=True)
    train.save_checkpoint(runs / name / "ckpt.pt", model, train.make_optimizer(model, cfg),
                          cfg.total_steps if finished else 1, 0.0, cfg)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from conftest import tiny_tokenizer

    root = tmp_path_factory.mktemp("family")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    for name, hidden in MEMBERS.items():
        write_member(root / "runs", name, hidden, len(tokenizer))
    sentences = ["To be, or not to be, that is the question.", "In the beginning was the word.",
                 "The quick brown fox jumps over the lazy dog."]
    for i, split in enumerate(("test", "unseen", "validation")):
        text = " ".join(sentences[(i + j) % 3] for j in range(40))
        (root / f"{split}.txt").write_text(text + "\n\n\n" + text[::-1] + "\n")
    return root


def evaluate_args(root: Path, results: Path, members: str, *extra: str) -> list[str]:
    return ["evaluate", "--runs", str(root / "runs"), "--results", str(results), "--tokenizer", str(root / "tokenizer"),
            "--members", members, "--one-x", "t48", "--ks", "1,2", "--grid", "0,0.5", "--calib-k", "2",
            "--calib-windows", "4", "--window", "16", "--max-windows", "12", "--test-text", str(root / "test.txt"),
            "--unseen-text", str(root / "unseen.txt"), "--validation-text", str(root / "validation.txt"), *extra]


@pytest.fixture(scope="module")
def evaluated(family, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measure, "CHUNK", 8)  # 12 windows: two chunks, so a unit is written and resumed mid-way
        es.main(evaluate_args(family, results, ",".join(MEMBERS)))
    return results


def test_evaluate_scores_every_member_on_the_same_windows_in_order(family, evaluated):
    from transformers import AutoTokenizer

    from roe.eval.perplexity import clean_score_fn, roster_nll, window_nll
    from roe.loading import held_out_windows

    tokenizer = AutoTokenizer.from_pretrained(family / "tokenizer")
    windows_NW = held_out_windows(tokenizer, family / "test.txt", 16, 12)
    units = {name: measure.read_unit(evaluated, name, "test", 1) for name in MEMBERS}
    assert {u["meta"]["fingerprint"] for u in units.values()} == {measure.fingerprint(windows_NW)}
    model, _ = measure.load_member(family / "runs" / "t32", tokenizer.eos_token_id)
    for i in (0, 5, 11):  # window i's value is window i's NLL, whatever chunk it was scored in
        alone = window_nll(clean_score_fn(model), windows_NW[i : i + 1])
        assert units["t32"]["nll"][i] == pytest.approx(float(alone[0]), abs=1e-6)
    one_x, _ = measure.load_member(family / "runs" / "t48", tokenizer.eos_token_id)
    tau = json.loads((evaluated / "schedule_t48.json").read_text())["tau"]
    whole = roster_nll(one_x, measure.roe_config(2, tau, 0), windows_NW)  # one run, no chunks
    assert measure.read_unit(evaluated, "t48", "test", 2)["nll"] == pytest.approx(whole.tolist(), abs=1e-6)
    assert units["t32"]["nll"] != units["t48"]["nll"]  # different models: not one series copied


def test_evaluate_resumes_a_unit_it_was_interrupted_in(family, evaluated, tmp_path, monkeypatch):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(evaluated, results)
    path = measure.unit_path(results, "t32", "test", 1)
    full = json.loads(path.read_text())
    path.write_text(json.dumps({**full, "nll": full["nll"][:8]}))  # interrupted after its first chunk
    scored = []
    real = measure.scored_unit

    def counting(path, meta, windows_NW, score, progress=None):
        return real(path, meta, windows_NW, lambda w: scored.append(len(w)) or score(w), progress)

    monkeypatch.setattr(measure, "scored_unit", counting)
    monkeypatch.setattr(measure, "CHUNK", 8)
    es.main(evaluate_args(family, results, "t32"))
    assert scored == [4]  # only the 4 windows it had not scored (every other unit was complete)
    assert json.loads(path.read_text())["nll"] == pytest.approx(full["nll"], abs=1e-9)


def test_missing_or_unfinished_members_are_refused(family, tmp_path):
    with pytest.raises(SystemExit, match="absent.*no checkpoint"):
        es.main(evaluate_args(family, tmp_path, "t32,absent"))
    write_member(tmp_path / "runs", "half", 32, 300, finished=False)
    with pytest.raises(SystemExit, match="half.*step 1/2"):
        measure.load_member(tmp_path / "runs" / "half", 0)
    assert measure.missing_members(tmp_path / "runs", ["half"]) == {"half": "step 1/2"}
    assert measure.missing_members(tmp_path / "runs", ["half"], allow_unfinished=True) == {}
    with pytest.raises(SystemExit, match="t64.*no checkpoint"):  # latency too, before loading anything
        es.main(["latency", "--runs", str(tmp_path / "runs"), "--members", "half,t64", "--one-x", "half",
                 "--allow-unfinished", "--results", str(tmp_path)])


def test_fit_refuses_missing_members_and_units_scored_on_other_windows(family, evaluated, tmp_path):
    import shutil

    with pytest.raises(SystemExit, match=r"t32 K=1.*evaluate"):
        fit.fit_all(tmp_path, list(MEMBERS), "t48", [1, 2], resamples=10)
    results = tmp_path / "results"
    shutil.copytree(evaluated, results)
    path = measure.unit_path(results, "t64", "unseen", 1)
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "meta": {**doc["meta"], "fingerprint": "0" * 16}}))
    with pytest.raises(SystemExit, match="different windows"):
        fit.fit_all(results, list(MEMBERS), "t48", [1, 2], resamples=10)


def test_fit_latency_and_report_write_the_result(family, evaluated, tmp_path):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(evaluated, results)
    common = ["--runs", str(family / "runs"), "--results", str(results), "--members", ",".join(MEMBERS),
              "--one-x", "t48", "--ks", "1,2"]
    with pytest.raises(SystemExit, match="fit.json"):
        es.main(["report", "--results", str(results)])
    doc = es.main(["fit", *common, "--resamples", "50"]) or json.loads((results / "fit.json").read_text())
    assert set(doc["texts"]) == {"test", "unseen"}
    timing = ["latency", *common, "--tokenizer", str(family / "tokenizer"), "--prompt-text", str(family / "test.txt"),
              "--steps", "2", "--batches", "1,2", "--prompt-tokens", "8", "--no-kernels"]
    es.main([*timing, "--rounds", "1"])
    first = json.loads((results / "latency.json").read_text())["rounds"]
    es.main([*timing, "--rounds", "2"])  # resumed: the round already measured is kept, one is added
    assert json.loads((results / "latency.json").read_text())["rounds"][:1] == first
    with pytest.raises(SystemExit, match="measured under"):  # other configurations never join those rounds
        es.main([*timing, "--rounds", "3", "--ks", "1"])
    out_json, out_png = tmp_path / "eq.json", tmp_path / "eq.png"
    es.main(["report", "--results", str(results), "--json", str(out_json), "--png", str(out_png)])
    report = json.loads(out_json.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the report"))
    assert [m["member"] for m in report["family"]] == list(MEMBERS)
    assert all(m["step_ms_b1"]["median"] > 0 and m["step_ms_b2"]["median"] > 0 for m in report["family"])
    point = next(p for p in report["roe"] if p["K"] == 2)
    assert point["step_ms_b1"] is not None and "equivalent" in point["test"]["params"]
    assert out_png.stat().st_size > 10_000
    timing = json.loads((results / "latency.json").read_text())["rounds"][0]["times_ms"]
    assert set(timing) == {f"{m} K=1 B={b}" for m in MEMBERS for b in (1, 2)} | {"t48 K=2 B=1", "t48 K=2 B=2"}


# -- fine-tuned versions of the 1x on the family's curve (RoE-aware training and its control) -------

def test_a_fine_tuned_1x_is_placed_on_the_curve_with_the_same_resamples():
    """A variant equal to the 1x's RoE points lands exactly on them (same windows resampled); one whose NLL is
    the line's at 30M lands there; a uniform shift leaves RoE's gain unchanged and moves the K = 1 NLL by it."""
    series = synthetic(4)
    line = -0.15 * math.log(30e6 / SIZES[2]) - (-0.15) * math.log(25e6 / SIZES[2])  # from 25M's NLL to 30M's
    variants = {"same": series.roe_KN, "bigger": series.roe_KN + line, "shifted": series.roe_KN - 0.01}
    out = fit.fit_axis(fit.Series(**{**series.__dict__, "variants": variants}), "params", resamples=300)
    curve = out["curves"]["log-linear"]
    assert curve["variants"]["same"] == curve["points"]
    bigger = curve["variants"]["bigger"][1]
    assert bigger["ci95"][0] < 30e6 < bigger["ci95"][1] and bigger["equivalent"] == pytest.approx(30e6, rel=0.1)
    assert bigger["ratio_on_curve"] == pytest.approx(curve["points"][1]["ratio_on_curve"], rel=1e-6)
    rows = fit.summary_rows(fit.Series(**{**series.__dict__, "variants": variants}))["variants"]
    assert rows["same"][1]["gain_change"] == 0 and rows["shifted"][1]["gain_change"] == pytest.approx(0, abs=1e-12)
    assert rows["shifted"][0]["delta_vs_1x_K1"] == pytest.approx(-0.01, abs=1e-12)
    assert rows["shifted"][1]["delta_vs_K1"] == pytest.approx(rows["same"][1]["delta_vs_K1"], abs=1e-12)


def test_fit_places_an_evaluated_fine_tune_and_refuses_one_scored_on_other_windows(family, evaluated, tmp_path):
    import shutil

    results, tuned = tmp_path / "results", tmp_path / "tuned"
    shutil.copytree(evaluated, results)
    from conftest import tiny_tokenizer

    write_member(tmp_path / "tuned-runs", "t48", 48, len(tiny_tokenizer()), seed=1)  # another t48: the "fine-tune"
    es.main(evaluate_args(family, tuned, "t48", "--runs", str(tmp_path / "tuned-runs")))
    common = ["fit", "--results", str(results), "--members", ",".join(MEMBERS), "--one-x", "t48", "--ks", "1,2",
              "--resamples", "20"]
    doc = es.main([*common, "--variant", f"tuned={tuned}"]) or json.loads((results / "fit.json").read_text())
    assert doc["variants"] == ["tuned"]
    rows = doc["texts"]["test"]["variants"]["tuned"]
    assert [r["K"] for r in rows] == [1, 2] and rows[0]["delta_vs_1x_K1"] != 0  # another checkpoint, scored
    assert len(doc["texts"]["unseen"]["axes"]["params"]["curves"]["log-linear"]["variants"]["tuned"]) == 2
    reported = fit.report(doc, None)["variants"]["tuned"][1]["unseen"]
    axis = doc["texts"]["unseen"]["axes"]["active_params"]
    on_curve = axis["curves"][axis["chosen"]]["variants"]["tuned"][1]
    assert reported["active_params"] == {"curve": axis["chosen"], **on_curve} and reported["delta_vs_K1"] == \
        doc["texts"]["unseen"]["variants"]["tuned"][1]["delta_vs_K1"]
    with pytest.raises(SystemExit, match="NAME=DIR"):
        es.main([*common, "--variant", str(tuned)])
    other = tmp_path / "other-windows"
    es.main(evaluate_args(family, other, "t48", "--runs", str(tmp_path / "tuned-runs"), "--max-windows", "6"))
    with pytest.raises(SystemExit, match="different windows"):
        es.main([*common, "--variant", f"tuned={other}"])


# -- a second training run of a member (training noise) on the family's curve ----------------------

def test_a_second_run_of_a_member_is_placed_against_the_first():
    """A second run equal to the first lands at ratio 1 exactly (same resamples); one whose every window is the
    line's step from 1x to 1.2x the member's size lands at 1.2x, with an interval around it."""
    series = synthetic(5)
    first_N = series.nll_MN[1]
    step = -0.15 * math.log(1.2)  # the true line's change from the member's size to 1.2 times it
    again = {"m1": first_N + step + np.random.default_rng(1).normal(0, 0.05, len(first_N)), "m3": series.nll_MN[3]}
    out = fit.fit_axis(fit.Series(**{**series.__dict__, "replicates": again}), "params", resamples=300)
    placed = out["curves"]["log-linear"]["replicates"]
    assert placed["m3"]["ratio"] == 1 and placed["m3"]["ratio_ci95"] == [1, 1]
    slope = out["curves"]["log-linear"]["params"]["b"]
    shift = float((again["m1"] - first_N).mean())
    assert placed["m1"]["ratio"] == pytest.approx(math.exp(shift / slope), rel=1e-9)
    assert placed["m1"]["ratio_ci95"][0] < 1.2 < placed["m1"]["ratio_ci95"][1] < 1.6
    rows = fit.summary_rows(fit.Series(**{**series.__dict__, "replicates": again}))["replicates"]
    assert rows["m1"]["delta_vs_first"] == pytest.approx(shift) and 0 < rows["m1"]["delta_se"] < 0.01


def test_fit_places_a_second_run_and_refuses_one_it_cannot_pair(family, evaluated, tmp_path):
    import shutil

    from conftest import tiny_tokenizer

    results, again = tmp_path / "results", tmp_path / "again"
    shutil.copytree(evaluated, results)
    write_member(tmp_path / "again-runs", "t32", 32, len(tiny_tokenizer()), seed=7)  # t32 with another seed
    es.main(evaluate_args(family, again, "t32", "--runs", str(tmp_path / "again-runs")))
    common = ["fit", "--results", str(results), "--members", ",".join(MEMBERS), "--one-x", "t48", "--ks", "1,2",
              "--resamples", "20"]
    doc = es.main([*common, "--replicate", f"t32={again}"]) or json.loads((results / "fit.json").read_text())
    assert doc["replicates"] == ["t32"]
    first = json.loads(measure.unit_path(results, "t32", "test", 1).read_text())["nll"]
    second = json.loads(measure.unit_path(again, "t32", "test", 1).read_text())["nll"]
    row = doc["texts"]["test"]["replicates"]["t32"]
    assert row["delta_vs_first"] == pytest.approx(np.mean(second) - np.mean(first)) and row["delta_vs_first"] != 0
    reported = fit.report(doc, None)["replicates"]["t32"]
    assert set(reported) == {"test", "unseen"}  # the tiny random family's NLL need not fall: its ratio may be NaN
    assert reported["test"]["params"]["curve"] == doc["texts"]["test"]["axes"]["params"]["chosen"]
    assert reported["unseen"]["delta_vs_first"] == doc["texts"]["unseen"]["replicates"]["t32"]["delta_vs_first"]
    with pytest.raises(SystemExit, match="t99, which is not fitted"):
        es.main([*common, "--replicate", f"t99={again}"])
    with pytest.raises(SystemExit, match="a second run of t64"):
        es.main([*common, "--replicate", f"t64={again}"])
    with pytest.raises(SystemExit, match="--replicate takes NAME=DIR"):
        es.main([*common, "--replicate", str(again)])


# -- the training driver's deadline ---------------------------------------------------------------

@pytest.mark.parametrize("minutes", [-2, 2])
def test_until_is_the_next_such_time_even_across_midnight(minutes):
    """``--until HH:MM`` given at 22:14 for 01:05 means the coming night, not this morning (which has passed)."""
    import time
    now = time.time()
    target = time.gmtime(now + 60 * minutes)
    deadline = es.utc_deadline(f"{target.tm_hour:02d}:{target.tm_min:02d}")
    expected = now + 60 * minutes + (24 * 3600 if minutes < 0 else 0)
    assert expected - 61 <= deadline <= expected


# -- latency on members as initialised (no checkpoint) ----------------------------------------------

def test_latency_can_time_members_as_initialised_without_checkpoints(family, tmp_path):
    """``--weights init`` builds each member as ``train`` starts it (deterministic: its recipe's seed), needs no
    checkpoint, and records that the weights were not trained; a name outside the family is refused."""
    from tools.train import build_model

    model = es.initialised("d128", 0)
    again = build_model(es.FAMILY[-1].config(), vocab_size=es.VOCAB, eos_id=0)
    assert es.FAMILY[-1].name == "d128" and model.config.hidden_size == 128
    assert all(a.equal(b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    schedule = tmp_path / "tau.json"
    schedule.write_text(json.dumps({"tau": [0.2] * 6}))
    timing = ["latency", "--weights", "init", "--runs", str(tmp_path / "no-runs"), "--results", str(tmp_path / "r"),
              "--members", "d128", "--one-x", "d128", "--ks", "1,2", "--schedule", str(schedule),
              "--prompt-text", str(family / "test.txt"), "--rounds", "1", "--steps", "1", "--batches", "1",
              "--prompt-tokens", "8", "--no-kernels"]
    es.main(timing)
    doc = json.loads((tmp_path / "r" / "latency.json").read_text())
    assert doc["conditions"]["weights"] == "init" and doc["conditions"]["checkpoint_steps"] == {"d128": 0}
    assert doc["conditions"]["tau"] == [0.2] * 6 and doc["conditions"]["schedule"] == "tau.json"
    assert set(doc["rounds"][0]["times_ms"]) == {"d128 K=1 B=1", "d128 K=2 B=1"}
    with pytest.raises(SystemExit, match="checkpoint"):  # as trained, the same command needs the checkpoints
        es.main([*timing[:1], *timing[3:]])
    with pytest.raises(SystemExit, match="t48 is not in the family"):
        es.main([*timing[:10], "t48", *timing[11:]])
    for bad, reason in (("{not json", "not a schedule"), ('{"taus": [0.2]}', "not a schedule"),
                        ('{"tau": [0.2, -1]}', "temperatures >= 0")):
        schedule.write_text(bad)
        with pytest.raises(SystemExit, match=reason):
            es.main([*timing[:6], str(tmp_path / "r2"), *timing[7:]])


def test_train_runs_the_members_asked_for_in_the_family_order(tmp_path, monkeypatch):
    """``train --members`` (one driver per core) trains only those, in the family's order, and refuses others."""
    with pytest.raises(SystemExit, match="d999 not in the family"):
        es.main(["train", "--members", "d128,d999"])
    (tmp_path / "train.bin").write_bytes(b"")
    trained = []
    monkeypatch.setattr(es, "DATA", tmp_path)
    monkeypatch.setattr(es, "finished", lambda member: False)
    monkeypatch.setattr(es, "train_member", lambda member, threads, deadline: trained.append(member.label) or 0)
    monkeypatch.setattr(es, "export", lambda member, threads: {"steps_done": 0, "final_val_loss": None})
    with pytest.raises(SystemExit) as done:
        es.main(["train", "--members", "d128,d256"])
    assert done.value.code == 0 and trained == ["d256", "d128"]
    trained.clear()
    with pytest.raises(SystemExit):
        es.main(["train", "--members", "d128", "--seed", "1"])
    assert trained == ["d128-seed1"]
