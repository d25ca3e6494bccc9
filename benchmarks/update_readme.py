"""Copy the generated tables of README.md and docs/*.md from the JSON results in benchmarks/results
(never retyped).

    python benchmarks/update_readme.py

Each table sits between `<!-- begin NAME -->` and `<!-- end NAME -->` markers in README.md or in a
page of docs/ (a table may appear in several); NAME is the stem of its JSON file: models (roe models
--json), eval_* (roe eval --json), bench_* (roe bench --json), tasks (roe tasks --json), calibrate_*
(roe calibrate --json), serve_load (benchmarks/serve_load.py), profile (benchmarks/profile_step.py),
vllm_cost (benchmarks/vllm_cost.py), equivalent_size (benchmarks/equivalent_size.py report);
`NAME.summary` is a one-sentence summary of the same JSON (vllm_cost only), `NAME.roe` its RoE points
(equivalent_size only). A marker with no JSON result, or of no known kind, is an error:
a table between markers is never hand-typed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from roe.support import markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def eval_table(doc: dict) -> str:
    c = doc["conditions"]
    against_tau, against_file = c.get("against_tau"), c.get("against_schedule")
    against = against_tau if against_file is None else against_file
    lines = [f"{c['windows']} windows x {c['window_tokens']} tokens = {c['tokens']:,} predicted tokens of "
             f"`{Path(c['text']).name}`; schedule: {Path(str(c['schedule'])).name}; seed {c['seed']}; "
             f"torch {c['torch']}, transformers {c['transformers']}.", ""]
    header = ["K", "NLL", "perplexity", "bits/byte", "change vs K=1", "SE (paired)"]
    if against is not None:
        name = f"uniform {against_tau}" if against_file is None else Path(against_file).name
        what = f"one uniform tau {against_tau}" if against_file is None else f"schedule {name}"
        lines[0] += (f" Last columns: the same K with {what} on the same windows and noise, "
                     f"and the schedule minus it (negative: the schedule is better).")
        header += [f"{name}: change vs K=1", "schedule - baseline", "SE (paired)"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in doc["rows"]:
        cells = [str(r["K"]), f"{r['nll']:.4f}", f"{r['ppl']:.3f}", f"{r['bpb']:.4f}", f"{r['delta_nll']:+.5f}",
                 f"{r['delta_se']:.5f}"]
        if against is not None:
            cells += (["", "", ""] if r.get("against_nll") is None else
                      [f"{r['against_nll'] - r['nll'] + r['delta_nll']:+.5f}", f"{r['against_delta_nll']:+.5f}",
                       f"{r['against_delta_se']:.5f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(row: dict) -> str:
    low, high = row.get("step_ratio_range") or (None, None)
    ci = row.get("step_ratio_ci95")
    if ci is not None and high != low:
        return f"{row['step_ratio']:.2f} (CI {ci[0]:.2f}-{ci[1]:.2f}; range {low:.2f}-{high:.2f})"
    return f"{row['step_ratio']:.2f}" + (f" ({low:.2f}-{high:.2f})" if low is not None and high != low else "")


def bench_table(doc: dict) -> str:
    c = doc["conditions"]
    lines = [f"{c['cpu']}, {c['cores']} cores, {c['threads']} threads, {c['dtype']}, torch {c['torch']}, "
             f"transformers {c['transformers']}; {c['params'] / 1e6:.1f} M-parameter model; prompt "
             f"{c['prompt_tokens']} tokens, up to {c['new_tokens']} new tokens (time box {c['time_box_s']} s); "
             f"schedule {Path(str(c['schedule'])).name}.", "",
             "| method | K | decode step (ms) | x K=1 | TTFT (ms) | tokens/s | peak RSS (MB) | x K=1 | KV bytes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    if c.get("repeats", 1) > 1:
        lines[0] += (f" {c['repeats']} rounds: times are medians over rounds; x K=1 is the median of the ratios "
                     "taken within each round, with a 95% distribution-free confidence interval of that median "
                     "(from 6 rounds) and the range.")
    lines += [f"| {r['method']} | {r['K']} | {r['decode_step_ms']:.1f} | {_ratio(r)} | {r['ttft_ms']:.0f} | "
              f"{r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_ratio']:.3f} | {r['kv_bytes']:,} |"
              for r in doc["rows"]]
    return "\n".join(lines)


def tasks_table(doc: dict) -> str:
    c = doc.get("conditions", {})
    lines = [", ".join(f"{k.replace('_', ' ')} {v}" for k, v in c.items()
                       if k in ("text", "roster_size", "schedule", "seed", "context_tokens")) + ".", "",
             "| task | model | items | accuracy | 95% CI | both right | base only | RoE only | McNemar p |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["rows"]:
        paired = (f"{r['both_right']} | {r['base_only']} | {r['roe_only']} | {r['p_value']:.3f}"
                  if "p_value" in r else "- | - | - | -")
        lines.append(f"| {r['task']} | {r['model']} | {r['items']} | {r['accuracy']:.3f} | "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {paired} |")
    return "\n".join(lines)


def calibrate_table(doc: dict) -> str:
    p = doc["provenance"]
    # the uniform grid puts its tau on the searched layers: every MoE layer when none is skipped
    every = p["skip_first"] == p["skip_last"] == 0
    lines = [f"Validation split, {p['windows']} windows x {p['window_tokens']} tokens = {p['tokens']:,} tokens, "
             f"K={p['K']}, {p['trials']} TPE trial{'s' if p['trials'] != 1 else ''} over "
             + ("every MoE layer" if every else
                f"the MoE layers but the first {p['skip_first']} and the last {p['skip_last']}")
             + f", tau in [0, {p['tau_max']}], seed {p['seed']}.", "",
             "| schedule | tau | validation NLL | change vs K=1 |", "| --- | --- | --- | --- |",
             f"| base (K=1) | - | {p['base_value']:.5f} | +0.00000 |"]
    label = "uniform, every layer" if every else "uniform, middle layers"
    lines += [f"| {label} | {u['tau']:g} | {u['nll']:.5f} | {u['nll'] - p['base_value']:+.5f} |"
              for u in doc["uniform"]]
    seed = p.get("best_uniform_value") == p["best_value"]  # TPE found nothing better than its uniform seed
    name = "best: the uniform seed" if seed else "TPE per layer"
    lines.append(f"| {name} | {', '.join(f'{t:.3f}' for t in doc['tau'])} | {p['best_value']:.5f} | "
                 f"{p['best_value'] - p['base_value']:+.5f} (SE {p['best_delta_se']:.5f}) |")
    return "\n".join(lines)


def serve_table(doc: dict) -> str:
    c = doc["conditions"]
    return "\n".join([
        f"{c['clients']} concurrent clients x {c['requests_per_client']} completions of {c['max_tokens']} tokens, "
        f"roster_size {c['roster_size']}, tau {c['tau']}, max batch {c['max_batch']}, model {c['model']}.", "",
        "| requests | ok | errors | req/s | completion tok/s | p50 latency (s) | p99 latency (s) | batches | "
        "RSS before -> after (MB) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {doc['requests']} | {doc['ok']} | {doc['errors'] or 'none'} | {doc['requests_per_s']:.2f} | "
        f"{doc['completion_tokens_per_s']:.1f} | {doc['latency_p50_s']:.3f} | {doc['latency_p99_s']:.3f} | "
        f"{doc['batches']} | {doc['rss_before_mb']:.0f} -> {doc['rss_after_mb']:.0f} |"])


def profile_table(doc: dict) -> str:
    names = list(doc["profiles"][0]["shares"])
    lines = [f"torch.profiler over roster decode steps, {doc['threads']} threads; share of step time by stage.", "",
             "| K | median step (ms) | " + " | ".join(names) + " |", "| --- " * (len(names) + 2) + "|"]
    for prof in doc["profiles"]:
        lines.append(f"| {prof['K']} | {prof['step_ms_median']:.1f} | "
                     + " | ".join(f"{prof['shares'][n] * 100:.0f}%" for n in names) + " |")
    top = doc["profiles"][-1]
    lines += ["", f"Top operators at K={top['K']} (self CPU ms per step): "
              + ", ".join(f"`{o['op']}` {o['self_ms_per_step']:.2f}" for o in top["top_ops"][:6]) + "."]
    return "\n".join(lines)


def _paired(row: dict, key: str) -> str:
    ci, (low, high) = row[f"{key}_ratio_ci95"], row[f"{key}_ratio_range"]
    return f"{row[f'{key}_ratio']:.2f}" + (f" (CI {ci[0]:.2f}-{ci[1]:.2f})" if ci and high != low else "")


def vllm_cost_table(doc: dict) -> str:
    c = doc["conditions"]
    tau = "the shipped schedule" if isinstance(c["tau"], list) else f"uniform tau {c['tau']}"
    lines = [f"{c['gpu'] or c['cpu']}, {c['cores']} cores, {c['threads']} thread(s), {c['dtype']}, vLLM {c['vllm']}, "
             f"torch {c['torch']}; {c['model']} model, {tau}; prompt {c['prompt_tokens']} tokens, "
             f"{c['new_tokens']} new tokens per request; engine in-process, eager, prefix caching off; "
             f"{c['rounds']} rounds: times are medians over rounds, x plain the median of the ratios within each "
             "round with a 95% distribution-free CI. CPU: the process CPU time of a step; wall: its wall time. "
             f"Targets for K=8: at most {doc['targets']['B=1']['target']}x plain at B=1, "
             f"{doc['targets']['B=8']['target']}x at B=8.", "",
             "| B | method | step CPU (ms) | x plain | step wall (ms) | x plain | TTFT (ms) | KV bytes held |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    k8 = ", ".join(f"{t['cpu_ratio']:.2f}x plain at {b} (target {t['target']}x)" for b, t in doc["targets"].items())
    lines[0] += f" K=8 measured (CPU time): {k8}."
    load = c.get("load_average_1min_before_after")
    if load:
        lines[0] += f" Machine load average (1 min): {load[0]:.1f} before, {load[1]:.1f} after."
    lines += [f"| {r['B']} | {r['method']} | {r['step_cpu_ms']:.1f} | {_paired(r, 'cpu')} | {r['step_wall_ms']:.1f} | "
              f"{_paired(r, 'wall')} | {r['ttft_ms']:.0f} | {', '.join(f'{b:,}' for b in r['kv_bytes'])} |"
              for r in doc["rows"]]
    return "\n".join(lines)


def vllm_cost_summary(doc: dict) -> str:
    """One sentence for the README: K=8 against plain vLLM at each batch, and whether KV bytes move with K."""
    c, at = doc["conditions"], doc["targets"]
    ratios = " and ".join(f"{t['cpu_ratio']:.2f}x at batch {b.removeprefix('B=')} (target {t['target']}x)"
                          for b, t in at.items())
    kv = {r["B"]: set() for r in doc["rows"]}
    for r in doc["rows"]:
        kv[r["B"]].add(tuple(r["kv_bytes"]))
    same = "the same at every K" if all(len(v) == 1 for v in kv.values()) else "NOT the same at every K"
    return (f"Cost inside vLLM (`benchmarks/vllm_cost.py`, {c['prompt_tokens']}-token prompt, "
            f"{c['threads']} thread(s), {c['rounds']} rounds): K=8 takes {ratios} plain vLLM's decode step "
            f"(CPU time, median of within-round ratios); KV bytes {same}.")


def _step(cell: dict | None) -> str:
    if cell is None:
        return ""
    ci = cell["ci95"]
    return f"{cell['median']:.1f}" + (f" ({ci[0]:.1f}-{ci[1]:.1f})" if ci else "")


def _timing(doc: dict) -> str:
    c = doc["latency_conditions"] or {}
    if not c:
        return "Decode steps: not measured."
    weights = ("the members' shapes as initialised (untrained: the same arithmetic, other routing)"
               if c.get("weights") == "init" else "the trained checkpoints")
    return (f"Decode step: median ms (95% CI) of {c['steps_per_round']} steps x {doc['latency_rounds']} interleaved "
            f"rounds after a {c['prompt_tokens']}-token prompt, {c['threads']} thread, {c['dtype']}, torch "
            f"{c['torch']}, timed on {weights}.")


def equivalent_size_table(doc: dict) -> str:
    """The family of benchmarks/equivalent_size.py: sizes, held-out NLL on both texts, decode step at K = 1."""
    one_x = doc["roe"][0]["member"]
    base = next(m["params"] for m in doc["family"] if m["member"] == one_x)
    w = doc["windows"]
    lines = [f"Held-out NLL (nats/token +- SE) on {w['test']} windows of the test split and {w['unseen']} of "
             f"English no member saw, 256 tokens each. {_timing(doc)}", "",
             "| member | params | x 1x | active params | test NLL | unseen NLL | step B=1 (ms) | step B=8 (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {m['member']} | {m['params'] / 1e6:.2f} M | {m['params'] / base:.2f} | "
              f"{m['active_params'] / 1e6:.2f} M | {m['nll_test']:.4f} +- {m['se_test']:.4f} | "
              f"{m['nll_unseen']:.4f} +- {m['se_unseen']:.4f} | "
              f"{_step(m.get('step_ms_b1'))} | {_step(m.get('step_ms_b8'))} |" for m in doc["family"]]
    return "\n".join(lines)


def equivalent_size_roe_table(doc: dict) -> str:
    """RoE-K on the 1x member: its paired change, its equivalent size relative to the 1x's own point, its step."""
    one_x = doc["roe"][0]["member"]
    k1 = next(m for m in doc["family"] if m["member"] == one_x)
    def shape(text: str) -> str:  # the chosen curve on total parameters: its slope, or its exponent
        fitted = doc["fits"][text]["params"]
        params = fitted[fitted["chosen"]]["params"]
        return f"{text}: {fitted['chosen']}, " + (f"b = {params['b']:.3f} per e-fold" if "b" in params else
                                                  f"alpha = {params['alpha']:.3f}")

    slope = "; ".join(shape(text) for text in ("test", "unseen"))
    lines = [f"RoE-K on {one_x}, paired per window against its K = 1. Equivalent size: the total parameters at "
             f"which the family's fitted curve ({slope}) reaches RoE-K's NLL, over "
             f"where {one_x}'s own K = 1 lands on it (95% CI: {doc['bootstrap']['resamples']} bootstrap resamples "
             f"of windows). The paper reads {doc['paper']['ratio_to_1x']}x at K = {doc['paper']['K']}.", "",
             "| K | test: change | test: equivalent size | unseen: change | unseen: equivalent size | "
             "step B=1 (ms) | x K=1 | step B=8 (ms) | x K=1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def size(part: dict) -> str:
        on = part["params"]
        return f"{on['ratio_on_curve']:.4f}x ({on['ratio_on_curve_ci95'][0]:.4f}-{on['ratio_on_curve_ci95'][1]:.4f})"

    def ratio(point: dict, batch: int) -> str:
        cell, base = point.get(f"step_ms_b{batch}"), k1.get(f"step_ms_b{batch}")
        return f"{cell['median'] / base['median']:.2f}" if cell and base else ""

    for p in (q for q in doc["roe"] if q["K"] > 1):
        t, u = p["test"], p["unseen"]
        lines.append(f"| {p['K']} | {t['delta_vs_K1']:+.5f} +- {t['delta_se']:.5f} | {size(t)} | "
                     f"{u['delta_vs_K1']:+.5f} +- {u['delta_se']:.5f} | {size(u)} | {_step(p.get('step_ms_b1'))} | "
                     f"{ratio(p, 1)} | {_step(p.get('step_ms_b8'))} | {ratio(p, 8)} |")
    return "\n".join(lines)


RENDER = {"models": lambda d: markdown_table(d["rows"]), "eval": eval_table, "bench": bench_table,
          "tasks": tasks_table, "calibrate": calibrate_table, "serve": serve_table, "profile": profile_table,
          "vllm_cost": vllm_cost_table, "equivalent_size": equivalent_size_table}
PARTS = {"": RENDER, "summary": {"vllm_cost": vllm_cost_summary}, "roe": {"equivalent_size": equivalent_size_roe_table}}


def pages() -> list[Path]:
    """The pages that may hold generated tables: the README and the docs."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def render(name: str) -> str | None:
    """The table of the result NAME (or, for NAME.summary, its one-sentence summary), from the last line
    of benchmarks/results/NAME.json; None while that file is empty (its command failed or has not
    finished: the page keeps the text it has)."""
    stem, _, part = name.partition(".")
    kind = next((k for k in RENDER if stem.startswith(k)), None)
    renderers = PARTS.get(part, {})
    path = RESULTS / f"{stem}.json"
    if kind not in renderers or not path.exists():
        raise SystemExit(f"update_readme: no JSON result renders the table {name!r} ({path.name})")
    text = path.read_text().strip()
    if not text:
        print(f"skipped {path.name}: empty (its command failed or has not finished)")
        return None
    try:  # JSON lines (the last run is the last line), or one indented document (equivalent_size)
        doc = json.loads(text.splitlines()[-1])
    except json.JSONDecodeError:
        doc = json.loads(text)
    return renderers[kind](doc)


BLOCK = re.compile(r"^(<!-- begin (\S+) -->\n).*?^(<!-- end \2 -->)$", re.S | re.M)


def regenerate(text: str) -> str:
    """TEXT with every marked table replaced by its rendering from the JSON results."""

    def table(m: re.Match) -> str:
        new = render(m.group(2))
        return m.group(0) if new is None else m.group(1) + new + "\n" + m.group(3)

    return BLOCK.sub(table, text)


def main() -> None:
    for page in pages():
        text = page.read_text()
        new = regenerate(text)
        if new != text:
            page.write_text(new)
            print(f"updated {page.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
