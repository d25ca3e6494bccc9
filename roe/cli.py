"""The `roe` command line: each subcommand is a typed function whose docstring is its --help.

``build_parser`` turns a function's keyword parameters into options (``roster_size`` becomes
``--roster-size``; short aliases in ``SHORT``); a parameter without a default is positional.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

SHORT = {"roster_size": "-K"}


@dataclass(frozen=True)
class RoEOptions:
    """The RoE options the commands share, resolved once: --tau or --schedule, --seed, --experts-per-token.

    Temperatures: --schedule FILE, else a uniform --tau on the middle MoE layers, else (neither)
    the model's default schedule: the schedule.json shipped in its directory, else uniform 0.1
    (roe/schedule.py). --experts-per-token k: every member selects k experts per token (None: the
    model's own). --no-kernels: decode steps keep the model's own products (RoEConfig.kernels).
    ``config(K)`` is the roster's RoEConfig at roster size K.
    """

    tau: float | None = None
    schedule: str | None = None
    seed: int = 0
    experts_per_token: int | None = None
    kernels: bool = True

    def __post_init__(self) -> None:
        if self.schedule and self.tau is not None:
            raise ValueError("give --tau or --schedule, not both")

    def config(self, roster_size: int, skip_first: int = 1, skip_last: int = 1):
        from roe import RoEConfig

        return RoEConfig(roster_size=roster_size, tau=self.schedule if self.schedule else self.tau, seed=self.seed,
                         skip_first=skip_first, skip_last=skip_last, experts_per_token=self.experts_per_token,
                         kernels=self.kernels)

    def check(self, lm) -> None:
        """Refuse a schedule of another layer count or model now, before any scoring."""
        from roe.roster import schedule_for

        schedule_for(lm, self.config(1))

    def shown(self, lm) -> str:
        """The schedule as reported: its file, a uniform tau, or the model's default (its file, else uniform)."""
        from roe.schedule import DEFAULT_TAU, SCHEDULE_FILE, model_default_schedule

        if self.schedule:
            return _shown_path(self.schedule)
        if self.tau is not None:
            return f"uniform tau={self.tau}"
        if model_default_schedule(lm.name_or_path) is None:
            return f"model default: uniform tau={DEFAULT_TAU}"
        shipped = Path(lm.name_or_path) / SCHEDULE_FILE
        return _shown_path(shipped) if shipped.is_file() else f"{lm.name_or_path}/{SCHEDULE_FILE}"


def _held_out_text(text: str | None, model: str | None, split: str):
    """--text FILE, else the embedded model's held-out split (which belongs to it: not with --model)."""
    from roe.loading import default_split_path

    if text is None and model is not None:
        raise ValueError(f"--text FILE is required with --model (the built-in {split} split belongs to the "
                         "default model)")
    return text or default_split_path(split)


def _windows(lm, tokenizer, source, window: int, max_windows: int):
    """The scored windows of ``source`` (roe.loading.held_out_windows), refused if longer than the context."""
    from roe.loading import held_out_windows

    windows_NW = held_out_windows(tokenizer, source, window, max_windows)
    _check_fits(lm, window, f"--window {window}")  # the model reads a window's first `window` tokens
    return windows_NW


def generate(prompt: str, *, model: str | None = None, roster_size: int = 8, tau: float | None = None,
             schedule: str | None = None, seed: int = 0, max_new_tokens: int = 40,
             experts_per_token: int | None = None, no_kernels: bool = False, json_out: bool = False) -> None:
    """Continue PROMPT with the untouched model and with RoE (greedy), and print both.

    --model is a local checkpoint directory or hub id (default: the embedded model). -K is the
    roster size, --tau a uniform temperature on the middle MoE layers, --schedule a schedule
    JSON file; with neither, the model's default schedule (the schedule.json shipped in its
    directory, as the embedded model does, else uniform tau 0.1). Same seed, same output.
    --experts-per-token k: RoE's members select k experts per token in every MoE layer (the
    MoE-PHDS sparsity dial; -K 1 --tau 0 is the model run at k); the base stays the untouched model.
    --no-kernels: RoE's decode steps without roe's CPU kernels (every product the model's own).
    """
    import torch

    import roe

    options = RoEOptions(tau, schedule, seed, experts_per_token, kernels=not no_kernels)
    lm, tokenizer = roe.load(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty after tokenisation")
    _check_fits(lm, ids.shape[1] + max_new_tokens, f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens "
                                                   f"{max_new_tokens}")
    with torch.no_grad():
        base = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
    with roe.roster(lm, options.config(roster_size)) as r:
        ours = r.generate(ids, max_new_tokens=max_new_tokens)
    texts = {name: tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
             for name, out in (("base", base), ("roe", ours))}
    if json_out:
        print(json.dumps({"prompt": prompt, **texts, "roster_size": roster_size,
                          "schedule": list(r.schedule.tau), "experts_per_token": experts_per_token}))
        return
    print(f"prompt: {prompt}\n")
    print(f"--- base model (greedy) ---\n{prompt}{texts['base']}\n")
    taus = ", ".join(f"{t:.3g}" for t in r.schedule.tau)
    dial = "" if experts_per_token is None else f", {experts_per_token} experts per token"
    print(f"--- RoE K={roster_size}, tau per MoE layer [{taus}]{dial} (greedy) ---\n{prompt}{texts['roe']}")


def models(*, json_out: bool = False) -> None:
    """List the supported MoE families, the routing rule roe found for each, and how RoE runs on it.

    Every row is discovered live: a tiny random model of the family is built from its
    transformers config class, its routers are found and self-tested at tau = 0.
    """
    from roe.support import markdown_table, support_table

    rows = support_table()
    if json_out:
        print(json.dumps({"rows": rows}))
        return

    print(markdown_table(rows))


def evaluate(*, model: str | None = None, text: str | None = None, ks: str = "1,2,4,8,16,32",
             tau: float | None = None,
         schedule: str | None = None, seed: int = 0, window: int = 256, max_windows: int = 200,
         batch_size: int = 4, against_tau: float | None = None, against_schedule: str | None = None,
         experts_per_token: int | None = None, no_kernels: bool = False, json_out: bool = False,
         plot: str | None = None) -> None:
    """Held-out perplexity and bits per byte of the untouched model and of RoE over a K grid.

    Text: --text FILE (UTF-8; .gz allowed; documents separated by two blank lines), default the
    embedded model's test split. Windows: the token stream is cut into consecutive,
    non-overlapping windows of --window + 1 tokens (at most --max-windows, spread evenly), each
    scored on its own, predicting its last --window tokens. Every K is scored on the same
    windows, so delta_nll (against K = 1) is a paired per-window difference and delta_se its
    standard error, sd(per-window delta) / sqrt(windows). Temperatures: --schedule FILE or a
    uniform --tau, else the model's default schedule (its shipped schedule.json, else uniform 0.1).
    --against-tau T also scores, at every K > 1 and on the same windows and noise, one uniform
    tau T on the middle MoE layers (the first and last stay clean, as in calibrate's --uniform):
    against_delta_nll is the paired difference (schedule minus uniform; negative: the schedule
    is better) and against_delta_se its standard error. --against-schedule FILE does the same
    with a schedule file (e.g. one tau on every MoE layer, the paper's App. B baseline).
    --experts-per-token k: every row, K = 1 included, runs k experts per token (the MoE-PHDS
    sparsity dial), so the deltas are paired at that k. --no-kernels: no CPU kernel in RoE's
    decode steps (scoring uses none either way).
    """
    import roe
    from roe.eval.perplexity import perplexity_sweep, window_bytes

    grid = _parse_ks(ks)
    source = _held_out_text(text, model, "test")
    options = RoEOptions(tau, schedule, seed, experts_per_token, kernels=not no_kernels)
    if against_tau is not None and against_schedule:
        raise ValueError("give --against-tau or --against-schedule, not both")
    against = None
    if against_tau is not None or against_schedule:
        against = RoEOptions(against_tau, against_schedule, seed, experts_per_token, kernels=not no_kernels)
    if plot:
        _require("matplotlib", "--plot")
    lm, tokenizer = roe.load(model)
    for checked in (options, against):
        if checked is not None:
            checked.check(lm)
    windows = _windows(lm, tokenizer, source, window, max_windows)
    rows = perplexity_sweep(lm, windows, grid, options.config, batch_size,
                            bytes_total=window_bytes(tokenizer, windows), against=against and against.config)
    conditions = {"model": model or "embedded default", "text": _shown_path(source), "windows": len(windows),
                  "window_tokens": window, "tokens": int(windows[:, 1:].numel()), "seed": seed,
                  "schedule": options.shown(lm), "against_tau": against_tau,
                  "against_schedule": _shown_path(against_schedule) if against_schedule else None,
                  "experts_per_token": experts_per_token, "dtype": "float32", **_versions()}
    _report_perplexity(rows, conditions, against_label=_against_label(against), json_out=json_out, plot=plot)


def _against_label(against: RoEOptions | None) -> str | None:
    if against is None:
        return None
    return f"schedule {Path(against.schedule).name}" if against.schedule else f"uniform tau {against.tau}"


def _report_perplexity(rows, conditions: dict, against_label: str | None, json_out: bool, plot: str | None) -> None:
    """roe eval's table, plot and JSON line (the against columns only when there is an against)."""
    columns = ["K", "nll", "ppl", "bpb", "delta_nll", "delta_se"]
    if against_label is not None:
        columns += ["against_nll", "against_delta_nll", "against_delta_se"]
    print(_table(columns, [[getattr(r, c) for c in columns] for r in rows]))
    if plot:
        from roe.plots import plot_nll_vs_k

        plot_nll_vs_k(rows, plot, title=f"{conditions['model']}: held-out NLL vs roster size",
                      against_label=against_label)
    if json_out:
        shown = [{k: v for k, v in r.__dict__.items()
                  if k != "tau" and (against_label is not None or not k.startswith("against"))} for r in rows]
        print(json.dumps({"rows": shown, "conditions": conditions}, default=lambda x: None if math.isnan(x) else x))


def bench(*, model: str | None = None, ks: str = "1,2,4,8,16,32,64", prompt_tokens: int = 128,
          new_tokens: int = 64, methods: str = "roster,separate,batched-own-cache,recompute",
          tau: float | None = None,
          schedule: str | None = None, seed: int = 0, time_box: float = 15.0, threads: int = 0,
          repeats: int = 1, experts_per_token: int | None = None, no_kernels: bool = False,
          json_out: bool = False, plot: str | None = None) -> None:
    """Cost of RoE against K: decode-step time, time to first token, tokens/s, peak memory, KV bytes.

    Methods (all compute the same RoE step): roster (ours: one clean cache, members folded into
    one forward), separate (K forwards per step, each member with its own KV cache),
    batched-own-cache (one forward of K batch rows, each with its own cache), recompute (no
    cache, the whole sequence re-run for K members each step). Each (method, K) runs a clean
    prefill of --prompt-tokens tokens and up to --new-tokens greedy steps, cut at --time-box
    seconds; the decode step is the median over the steps. Each (method, K) first runs a
    2-token warm-up on its roster (one-time work is not a request's cost); K=1 is measured
    first and every row also shows its ratio to K=1 of the same method. --repeats N runs the
    whole sweep N times: times are medians over the rounds, and each ratio is taken within a
    round (paired, so a slow spell of a shared machine cancels) and then its median, with the
    range over rounds in step_ratio_range and, from 6 rounds, a 95% distribution-free confidence
    interval of that median in step_ratio_ci95. Temperatures: --schedule or a uniform --tau, else
    the model's default schedule (its shipped schedule.json, else uniform 0.1).
    --experts-per-token k: every method and K runs k experts per token (the MoE-PHDS sparsity dial).
    --no-kernels: the roster's decode steps without roe's CPU kernels (packed LM head, small-M linear).
    """
    import platform

    import roe
    from roe.bench import METHODS, combine_rounds
    from roe.kernels import prepare as prepare_kernels

    grid, names = _parse_ks(ks), [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    options = RoEOptions(tau, schedule, seed, experts_per_token, kernels=not no_kernels)
    if plot:
        _require("matplotlib", "--plot")
    _set_threads(threads)
    lm, tokenizer = roe.load(model)
    _check_fits(lm, prompt_tokens + new_tokens, f"--prompt-tokens {prompt_tokens} plus --new-tokens {new_tokens}")
    prepare_kernels()  # built or loaded now: compiling must not land in a timed round
    prompt = _bench_prompt(lm, tokenizer, model, prompt_tokens)
    rounds = [_bench_round(lm, options, prompt, names, grid, new_tokens, time_box, f"{i + 1}/{repeats}")
              for i in range(repeats)]
    rows = combine_rounds(rounds)
    conditions = {"model": model or "embedded default", "params": sum(p.numel() for p in lm.parameters()),
                  "prompt_tokens": len(prompt), "new_tokens": new_tokens, "schedule": options.shown(lm),
                  "dtype": "float32", "cpu": platform.processor() or platform.machine(), "cores": _cores(),
                  "time_box_s": time_box, "repeats": repeats, "experts_per_token": experts_per_token,
                  "kernels": not no_kernels, **_versions()}
    _report_cost(rows, conditions, json_out=json_out, plot=plot)


def _bench_round(lm, options: RoEOptions, prompt, names: list[str], grid: list[int], new_tokens: int,
                 time_box: float, label: str) -> list:
    """One sweep of every method and K, each on a fresh roster after a 2-token warm-up."""
    import roe
    from roe.bench import measure

    rows = []
    for name in names:
        for K in grid:
            with roe.roster(lm, options.config(K)) as r:
                # warm-up: the roster's one-time work (probing the layers, packing the head) is
                # not a request's time to first token
                measure(name, r, prompt, 2, time_box)
                rows.append(measure(name, r, prompt, new_tokens, time_box))
            print(f"  round {label} {name:18s} K={K:<3d} step {rows[-1].decode_step_ms:8.2f} ms", file=sys.stderr)
    return rows


def _report_cost(rows: list[dict], conditions: dict, json_out: bool, plot: str | None) -> None:
    """roe bench's conditions line, table, plot and JSON line."""
    print("  ".join(f"{k}={v}" for k, v in conditions.items()))
    print(_table(["method", "K", "step_ms", "x K=1", "95% CI", "ttft_ms", "tok/s", "peak_rss_mb", "x K=1", "kv_bytes",
                  "steps"],
                 [[r["method"], r["K"], r["decode_step_ms"], r["step_ratio"],
                   "-" if r["step_ratio_ci95"] is None else "{:.2f}-{:.2f}".format(*r["step_ratio_ci95"]),
                   r["ttft_ms"], r["tokens_per_s"], r["peak_rss_mb"], r["rss_ratio"], r["kv_bytes"], r["steps"]]
                  for r in rows]))
    if plot:
        from roe.plots import plot_cost_vs_k

        plot_cost_vs_k(rows, plot, title=f"{conditions['model']}: decode cost vs roster size")
    if json_out:
        print(json.dumps({"rows": rows, "conditions": conditions}))


def calibrate(*, model: str | None = None, text: str | None = None, roster_size: int = 8, tau_max: float = 0.3,
              skip_first: int = 1, skip_last: int = 1, trials: int = 50, seed: int = 0, window: int = 256,
              max_windows: int = 100, batch_size: int = 4, uniform: bool = False,
              grid: str = "0,0.02,0.05,0.08,0.1,0.15,0.2,0.3", out: str = "schedule.json", json_out: bool = False,
              plot: str | None = None) -> None:
    """Search a per-layer temperature schedule with Optuna TPE on validation NLL; write it as JSON.

    Search space: tau in [0, --tau-max] for each MoE layer except the first --skip-first and last
    --skip-last (kept at 0). Objective: mean next-token NLL of a roster of -K members over windows
    of --window + 1 tokens of --text FILE (default: the embedded model's validation split;
    --model requires --text), at most --max-windows spread evenly. Every trial scores the same
    windows with the same --seed (also the TPE seed), so trials are compared paired. --uniform
    also sweeps one tau on all searched layers over --grid and seeds TPE with its best point, so
    TPE never ends worse than the best uniform tau on those layers. The paper's App. B baseline
    puts one tau on every MoE layer: that is --uniform with --skip-first 0 --skip-last 0 (compare
    it with another schedule on held-out text by roe eval --against-schedule). Writes the schedule with its
    provenance to --out (use it with --schedule in generate/eval/bench).
    """
    import roe
    from roe.calibrate import SearchSpace, num_moe_layers, search_schedule
    from roe.schedule import Schedule

    source = _held_out_text(text, model, "validation")
    points = _parse_grid(grid) if uniform else []
    _require("optuna", "roe calibrate")
    if plot:
        _require("matplotlib", "--plot")
    lm, tokenizer = roe.load(model)
    space = SearchSpace(num_layers=num_moe_layers(lm), tau_max=tau_max, skip_first=skip_first, skip_last=skip_last)
    windows = _windows(lm, tokenizer, source, window, max_windows)
    result = search_schedule(lm, windows, space, K=roster_size, trials=trials, seed=seed, grid=points,
                             batch_size=batch_size)
    provenance = _calibration_provenance(lm, result, space, windows, model=model, text=text, roster_size=roster_size,
                                         trials=trials, seed=seed)
    Schedule(tau=tuple(result.tau), provenance=provenance).save(out)
    rows = [["base (K=1)", "-", result.base_value, 0.0]]
    rows += [[f"uniform K={roster_size}", tau, value, value - result.base_value] for tau, value in result.uniform]
    rows.append([f"TPE K={roster_size}", "per-layer", result.best_value, result.best_value - result.base_value])
    print(_table(["schedule", "tau", "nll", "delta_nll"], rows))
    print(f"best per-layer tau: {[round(t, 4) for t in result.tau]}  (delta se {result.best_delta_se:.5f})")
    print(f"wrote {out}")
    if plot:
        from roe.plots import plot_calibration

        plot_calibration(result, plot, title=f"{provenance['model']}: temperature search, K={roster_size}")
    if json_out:
        print(json.dumps({"tau": list(result.tau), "trial_values": result.trial_values,
                          "uniform": [{"tau": t, "nll": v} for t, v in result.uniform], "schedule_path": str(out),
                          "provenance": provenance}))


def _calibration_provenance(lm, result, space, windows, *, model, text, roster_size: int, trials: int,
                            seed: int) -> dict:
    """Where a calibrated schedule came from: model, data, windows, search, result, date, versions."""
    import datetime

    import optuna

    from roe.schedule import model_fingerprint

    best_uniform = result.best_uniform
    return {"model": model or "embedded default", "data": str(text) if text else "embedded validation split",
            "windows": len(windows), "window_tokens": windows.shape[1] - 1, "tokens": int(windows[:, 1:].numel()),
            "K": roster_size, "objective": "validation_nll", "trials": trials, "tau_max": space.tau_max,
            "skip_first": space.skip_first, "skip_last": space.skip_last, "best_value": result.best_value,
            "base_value": result.base_value, "best_delta_se": result.best_delta_se,
            "best_uniform_tau": best_uniform[0] if best_uniform else None,
            "best_uniform_value": best_uniform[1] if best_uniform else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {**_versions(), "optuna": optuna.__version__}, "seed": seed,
            "fingerprint": model_fingerprint(lm)}


def _parse_grid(grid: str) -> list[float]:
    try:
        points = sorted({float(t) for t in grid.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--grid must be comma-separated numbers, got {grid!r}") from None
    if not points:
        raise ValueError("--grid is empty")
    return points


def tasks(*, model: str | None = None, text: str | None = None, roster_size: int = 8, tau: float | None = None,
          schedule: str | None = None, seed: int = 0, items: int = 200, task: str = "next-line,last-word",
          context_tokens: int = 200, batch_size: int = 8, export: str | None = None,
          experts_per_token: int | None = None, no_kernels: bool = False, json_out: bool = False) -> None:
    """Accuracy of the untouched model (K=1) and of RoE at -K on built-in tasks from held-out text.

    Text: --text FILE (default: the embedded model's test split; --model requires --text).
    next-line: the previous lines as context (at most --context-tokens tokens), the true next
    line and 3 seeded distractor lines from elsewhere in the file; each candidate is scored by
    the summed log-likelihood of its tokens (as lm-eval does); correct when the true line wins.
    last-word: a passage ending right before the last word (>= 4 letters) of a line; greedy
    generation; correct when the first generated word equals the true word. --items per task.
    Reports accuracy with a 95% Wilson interval and the paired comparison on the same items
    (McNemar counts and exact p-value). --export DIR writes the items as JSONL and lm-eval task
    YAMLs (lm_eval --include_path DIR --tasks roe_next_line,roe_last_word).
    Temperatures: --schedule FILE or a uniform --tau, else the model's default schedule (its
    shipped schedule.json, else uniform 0.1). --experts-per-token k: both rows, K = 1 included,
    run k experts per token (the MoE-PHDS sparsity dial), so the comparison is paired at that k.
    --no-kernels: RoE's decode steps without roe's CPU kernels (every product the model's own).
    """
    from tqdm import tqdm

    import roe
    from roe.eval import tasks as builtin

    names = [t.strip() for t in task.split(",") if t.strip()]
    if not names or set(names) - {"next-line", "last-word"}:
        raise ValueError(f"--task must be a comma-separated subset of next-line,last-word, got {task!r}")
    source = _held_out_text(text, model, "test")
    options = RoEOptions(tau, schedule, seed, experts_per_token, kernels=not no_kernels)
    lm, tokenizer = roe.load(model)
    made = _task_items(lm, tokenizer, source, names, items, seed, context_tokens)
    if export:
        for path in builtin.export_lm_eval(export, made.get("next-line", []), made.get("last-word", [])):
            print(f"wrote {path}", file=sys.stderr)
    bar = tqdm(total=2 * sum(len(made[n]) for n in names), desc="items", unit="item")
    rows = []
    for name in names:
        base = builtin.correct(lm, tokenizer, name, made[name], options.config(1), batch_size, bar)
        ours = builtin.correct(lm, tokenizer, name, made[name], options.config(roster_size), batch_size, bar)
        rows += _task_rows(name, base, ours, roster_size)
    bar.close()
    print(_table(["task", "model", "items", "accuracy", "ci_low", "ci_high", "delta", "base_only", "roe_only",
                  "p_value"],
                 [[r["task"], r["model"], r["items"], r["accuracy"], r["ci_low"], r["ci_high"], r.get("delta", ""),
                   r.get("base_only", ""), r.get("roe_only", ""), r.get("p_value", "")] for r in rows]))
    if json_out:
        conditions = {"model": model or "embedded default", "text": _shown_path(source), "roster_size": roster_size,
                      "schedule": options.shown(lm), "seed": seed, "context_tokens": context_tokens,
                      "experts_per_token": experts_per_token, **_versions()}
        print(json.dumps({"rows": rows, "conditions": conditions}))


def _task_items(lm, tokenizer, source, names: list[str], items: int, seed: int, context_tokens: int) -> dict:
    """The items of each named task from ``source``; refused if a task yields none or one does not fit."""
    from roe.eval import tasks as builtin

    docs = builtin.read_documents(source)
    makers = {"next-line": builtin.next_line_items, "last-word": builtin.last_word_items}
    made = {name: makers[name](docs, tokenizer, items, seed, context_tokens) for name in names}
    for name in names:
        if not made[name]:
            raise ValueError(f"{source} yields no {name} items (it needs documents of several distinct lines of "
                             ">= 20 characters; last-word also needs lines ending in a word of >= 4 letters)")
    longest = max(_task_tokens(tokenizer, item) for name in names for item in made[name])
    _check_fits(lm, longest, f"the longest item (--context-tokens {context_tokens} plus its answer)")
    return made


def _task_rows(name: str, base: list[bool], ours: list[bool], roster_size: int) -> list[dict]:
    """Accuracy with its Wilson interval for the base and RoE, and the paired comparison on RoE's row."""
    from roe.eval import tasks as builtin

    rows, n = [], len(base)
    for label, right in (("base", base), (f"roe K={roster_size}", ours)):
        low, high = builtin.wilson(sum(right), n)
        rows.append({"task": name, "model": label, "items": n, "accuracy": sum(right) / n, "ci_low": low,
                     "ci_high": high})
    rows[-1].update({"delta": (sum(ours) - sum(base)) / n, **builtin.mcnemar(base, ours)})
    return rows


def serve(*, model: str | None = None, host: str = "127.0.0.1", port: int = 8000, roster_size: int = 8,
          tau: float | None = None, schedule: list[str] | None = None, schedule_dir: str | None = None,
          default_schedule: str | None = None, seed: int = 0, api_key: str | None = None,
          allowed_hosts: str | None = None, max_batch: int = 8, max_queue: int = 64, timeout: float = 60.0,
          max_tokens_limit: int = 512, max_request_cost: int = 65536, max_body_bytes: int = 1 << 20,
          max_prompt_chars: int = 100_000, threads: int = 0) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (needs: pip install 'roe[serve]').

    Endpoints: GET /health (503 until warmed up), GET /v1/models, POST /v1/completions,
    POST /v1/chat/completions (streaming with "stream": true). -K, --tau and --seed are the
    defaults of requests that do not send roster_size, tau or seed as extra fields (no --tau: the
    model's default schedule). --schedule NAME=PATH (repeatable) and --schedule-dir DIR (each
    *.json there, named by its stem) register the schedule files a request may name in its
    "schedule" field; --default-schedule NAME is used when a request sends neither. Requests
    never name server paths.

    Security: --api-key KEY (else the VLLM_API_KEY environment variable, as vLLM) is required as
    "Authorization: Bearer KEY" on /v1 routes (401); bodies must be application/json (415); the
    Host header must name --host, an IP address or localhost, else one of --allowed-hosts (comma
    separated, "*" for any; 400). Limits: --max-body-bytes (413), --max-prompt-chars,
    --max-request-cost (roster_size x choices x max_tokens), --max-tokens-limit (all 400); beyond
    --max-queue waiting choices the server answers 429, after --timeout seconds 504.
    """
    import os

    from roe.serve import ServeConfig, registered_schedules, run

    key = api_key if api_key is not None else os.environ.get("VLLM_API_KEY") or None
    hosts = tuple(h.strip() for h in (allowed_hosts or "").split(",") if h.strip())
    cfg = ServeConfig(model_id=model or "roe-default", roster_size=roster_size, tau=tau,
                      schedules=registered_schedules(schedule or [], schedule_dir), schedule=default_schedule,
                      seed=seed, api_key=key, allowed_hosts=hosts, max_batch=max_batch, max_queue=max_queue,
                      timeout=timeout, max_tokens_limit=max_tokens_limit, max_request_cost=max_request_cost,
                      max_body_bytes=max_body_bytes, max_prompt_chars=max_prompt_chars, threads=threads)
    try:
        run(model=model, host=host, port=port, cfg=cfg)
    except ImportError as err:
        raise SystemExit(f"error: {err}") from None


def phds(*, model: str | None = None, ks: str | None = None, routing_tau: str | None = None, steps: int = 400,
         curriculum_steps: int = 100, lr: float = 3e-4, batch_size: int = 16, seq_len: int = 256,
         data: str | None = None, seed: int = 0, eval_windows: int = 32, ckpt_minutes: float = 4.0, threads: int = 0,
         out: str | None = None) -> None:
    """MoE-PHDS fine-tune: one checkpoint whose experts per token can be dialled at run time.

    --ks LIST (e.g. 1,2,3,4): the levels of experts per token. For --steps optimiser steps each
    step runs the model at a k drawn uniformly from them (through roe's runtime dial, exactly the
    model built with that k), then --curriculum-steps at min(ks), the sparsest (arXiv 2509.23012).
    A single level is the single-k ("oracle") fine-tune with the same budget; without --ks, the
    model's own k (a plain fine-tune, or a RoE-aware one with --routing-tau).
    --routing-tau TAU or FILE: RoE-aware training. Window b of each step's batch is roster member
    b: member 0 clean, the others selecting experts with RoE's routing noise at this temperature
    (uniform between one clean MoE layer at each end) or schedule JSON (one tau per MoE layer),
    a fresh noise seed each step, the model's clean gate weights at the chosen experts. A
    tools.train checkpoint file (ckpt.pt) is fine-tuned with `python -m tools.finetune` (the same
    options, from the repository root). Data: the default
    model's training windows (data/tokens, from python -m tools.tokenizer --encode in the repository),
    or --data: a directory with train.bin (and validation.bin), or a file of token ids (.npy, or
    flat uint16). --out DIR receives a checkpoint every --ckpt-minutes (and at each phase end);
    re-running the same command resumes from it, with the same result as an uninterrupted run. At
    the end DIR is a loadable checkpoint (config, weights in the input's dtype, tokenizer,
    schedule.json if the input has one) plus phds.json (settings, per-step log, clean (K = 1)
    validation NLL at every level before and after each phase).
    --threads N sets torch's intra-op threads (0: torch's default).
    """
    from roe import phds as fine_tune

    if out is None:
        raise ValueError("--out DIR is required (the checkpoint and the fine-tuned model go there)")
    if not (math.isfinite(ckpt_minutes) and ckpt_minutes >= 0):
        raise ValueError(f"--ckpt-minutes must be finite and >= 0, got {ckpt_minutes}")
    cfg = fine_tune.PhdsConfig(ks=None if ks is None else fine_tune.parse_levels(ks), steps=steps,
                               routing_tau=None if routing_tau is None else fine_tune.parse_routing_tau(routing_tau),
                               curriculum_steps=curriculum_steps, lr=lr, batch_size=batch_size, seq_len=seq_len,
                               seed=seed, eval_windows=eval_windows)
    _set_threads(threads)
    fine_tune.run(model, cfg, Path(out), data=None if data is None else Path(data), ckpt_minutes=ckpt_minutes)


def _check_fits(lm, tokens: int, what: str) -> None:
    """Refuse work longer than the model's context (max_position_embeddings) before doing any."""
    context = getattr(lm.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and tokens > context:
        raise ValueError(f"{what} = {tokens} tokens exceeds the model's context of {context} tokens")


def _task_tokens(tokenizer, item) -> int:
    """Tokens one task item puts through the model: context and its longest choice, or context and the word."""
    from roe.eval.tasks import ChoiceItem

    if isinstance(item, ChoiceItem):
        return max(len(tokenizer(item.context + choice).input_ids) for choice in item.choices)
    return len(tokenizer(item.context).input_ids) + 6  # generated_words' max_new_tokens


def _require(module: str, what: str) -> None:
    """Fail before any work when an optional extra is missing: failing after it would lose the results."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        extra = {"matplotlib": "plot", "optuna": "calibrate"}[module]
        raise ValueError(f"{what} needs {module}: pip install 'roe[{extra}]'") from None


def _shown_path(path) -> str:
    """A path as reported in results: relative to the package for embedded files (no machine paths)."""
    package = Path(__file__).resolve().parent.parent
    resolved = Path(path).resolve()
    return str(resolved.relative_to(package)) if resolved.is_relative_to(package) else str(path)


def _set_threads(threads: int) -> None:
    """--threads N: torch's intra-op threads (0: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _bench_prompt(lm, tokenizer, model, prompt_tokens: int):
    """The first tokens of the embedded test split, or seeded random ids for other models."""
    import torch

    from roe.loading import default_split_path

    if prompt_tokens < 1:
        raise ValueError("--prompt-tokens must be >= 1")
    if model is None and default_split_path("test").is_file():
        from roe.eval.perplexity import text_tokens

        ids = torch.from_numpy(text_tokens(tokenizer, default_split_path("test"))[:prompt_tokens])
        if len(ids) == prompt_tokens:
            return ids
    vocab = lm.get_output_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0))


COMMANDS = {"generate": generate, "eval": evaluate, "bench": bench, "models": models, "calibrate": calibrate,
            "tasks": tasks, "serve": serve, "phds": phds}


def _parse_ks(ks: str) -> list[int]:
    try:
        grid = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--ks must be comma-separated integers, got {ks!r}") from None
    if not grid or min(grid) < 1:
        raise ValueError(f"--ks needs roster sizes >= 1, got {ks!r}")
    return sorted(set(grid))


def _versions() -> dict:
    import platform

    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads()}


def _table(header: list[str], rows: list[list]) -> str:
    cells = [["-" if v is None else f"{v:.5f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _finite_at_least(minimum: float):
    return lambda value: math.isfinite(value) and value >= minimum


def _finite_above(minimum: float):
    return lambda value: math.isfinite(value) and value > minimum


# Options checked right after parsing, before any work, by parameter name (the same name means the
# same thing in every command): (test, what it requires). 0 never silently means "all".
CHECKS = {
    **dict.fromkeys(("tau", "against_tau"), (_finite_at_least(0), "must be finite and >= 0")),
    "tau_max": (_finite_above(0), "must be finite and > 0"),
    "time_box": (_finite_above(0), "must be a finite number of seconds > 0"),
    **dict.fromkeys(("roster_size", "window", "max_windows", "batch_size", "max_new_tokens", "prompt_tokens",
                     "experts_per_token", "new_tokens", "repeats", "trials", "items", "context_tokens"),
                    (_finite_at_least(1), "must be >= 1")),
    **dict.fromkeys(("seed", "skip_first", "skip_last", "threads"), (_finite_at_least(0), "must be >= 0")),
}
# What a None default means, for --help.
NONE_MEANS = {"model": "the embedded model", "tau": "the model's default schedule (its shipped schedule.json, "
              "else uniform 0.1)", "text": "the embedded model's held-out split",
              "experts_per_token": "the model's own", "ks": "the model's own experts per token",
              "routing_tau": "no routing noise"}
# What a flag does, for --help, where its name alone does not say it.
FLAG_HELP = {"json_out": "print the results as one JSON document, as the last line of stdout "
             "(after the table where there is one: | tail -n 1 > out.json)"}


class UsageError(SystemExit):
    """A user error: printed as argparse prints its own, exit status 2, no traceback; str() is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _annotation_type(annotation) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roe", description=sys.modules[__name__].__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"roe {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        doc = inspect.getdoc(fn) or ""
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        hints = typing.get_type_hints(fn)
        for param in inspect.signature(fn).parameters.values():
            kind = _annotation_type(hints[param.name])
            if param.default is inspect.Parameter.empty:
                p.add_argument(param.name, type=kind)
                continue
            flags = [f"--{param.name.replace('_', '-')}".replace("--json-out", "--json")]
            if param.name in SHORT:
                flags.insert(0, SHORT[param.name])
            if kind is bool:
                p.add_argument(*flags, dest=param.name, action="store_true", help=FLAG_HELP.get(param.name))
                continue
            if typing.get_origin(kind) is list:  # a repeatable option
                p.add_argument(*flags, dest=param.name, action="append", type=typing.get_args(kind)[0],
                               default=None, help="repeatable")
                continue
            shown = NONE_MEANS.get(param.name) if param.default is None else "%(default)s"
            p.add_argument(*flags, dest=param.name, type=kind, default=param.default,
                           help=f"default: {shown}" if shown else None)
    return parser


def _check_options(args: dict) -> None:
    for option, value in args.items():
        test, requirement = CHECKS.get(option, (None, ""))
        if test is not None and value is not None and not test(value):
            raise ValueError(f"--{option.replace('_', '-')} {requirement}, got {value}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("roe")
    except PackageNotFoundError:  # run from a source tree that was not installed
        import roe

        return roe.__version__


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    name = args.pop("command")
    try:
        _check_options(args)
        COMMANDS[name](**args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"roe {name}: error: {err}", file=sys.stderr)
        raise UsageError(str(err)) from None


if __name__ == "__main__":
    main()
