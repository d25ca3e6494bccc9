"""The quality-cost frontier of issue 19 item 3 on the embedded default model (32 experts, k = 4).

    python benchmarks/frontier.py --windows 32 --threads 1            # run or resume
    python benchmarks/frontier.py --plot-only                         # redraw from the JSON
    python benchmarks/frontier.py --sequence --items 200 --threads 1  # sequence sampling, run or resume
    python benchmarks/frontier.py --model models/default-phds --out benchmarks/results/frontier_phds.json \
        --plot benchmarks/results/frontier_phds.png --cost-from benchmarks/results/frontier.json
                                                                      # the same grid on another checkpoint

Grid: experts per token k in {1, 2, 3, 4, 6, 8} (the MoE-PHDS dial, ``RoEConfig.experts_per_token``)
x roster size K in {1, 2, 4, 8, 16}, the shipped schedule and seed 0 in every cell.

Quality: test-split NLL of every cell on the same windows (``roe.eval.perplexity``: windows of
``--window`` + 1 tokens spread evenly over the split, as ``roe eval``), as a paired per-window
change against the model as shipped (k = 4, K = 1, the untouched model): mean(delta_w) and
sd(delta_w) / sqrt(n). Members are keyed by (seed, member), so every cell shares its members'
noise with every other cell of the same k.

Cost: decode-step time of every cell from ``roe.bench.measure`` (the ``roster`` method, as
``roe bench``: a 2-token warm-up, then the median step of up to ``--new-tokens`` greedy steps).
A round measures all 30 cells, k = 4 K = 1 first and the rest in a seeded shuffled order; the
cost of a cell is the median over rounds of its ratio to k = 4 K = 1 *within the round*, with a
95% distribution-free CI from 6 rounds (``roe.bench.combine_rounds``). Rounds are interleaved
with the NLL work, so they sample the machine's load over the whole run.

Equal-cost comparisons (in the JSON's ``equal_cost``): each RoE cell (k, K > 1) against every
K = 1 cell with more experts (k' > k, "more experts"), and the best of those, and the best K = 1
cell of any k, measured no dearer than the RoE cell; each difference is paired per window (RoE
minus it; positive: the K = 1 cell is better), its SE ignores the uncertainty of the cost ratios.
``pareto`` lists the cells no other cell beats on both cost and NLL (point estimates).

Sequence-level sampling (``--sequence``, the JSON's ``sequence_sampling``; the full definitions are
``SEQUENCE_DEFINITION``, copied into the JSON): the other way to spend compute, on the last-word
task of ``roe tasks`` (the first generated word must equal the true last word of a line).
Greedy decoding at k = 4 with K in {1, 2, 4, 8} (K = 1 the untouched model, K > 1 RoE) against N
temperature samples (``--temperature``, seeded: sample n with seed + n) of the untouched model:
best-of-N keeps the sample of highest total log-likelihood under the model (untempered log-probs
summed over its ``--max-new-tokens`` tokens), majority vote the most frequent non-empty first
word (ties: the word seen first). N = 1, 2, 4, 8 are nested prefixes of the same 8 samples.
next-line is left out: it is scored by likelihood over 4 given lines, generates nothing, and
already is a best-of-4 by likelihood. Cost, measured in one run (its own rounds, interleaved):
every point timed the same way by ``roster.generate`` (median interval between step callbacks),
N samples as N rows of one batched decode; sequential samples cost N x (derived). Accuracy is
reported with its per-item SE and its change against K = 1 greedy paired per item; each RoE K is
compared with best-of-N and majority vote at the largest N measured no dearer (batched) and the
largest N <= its cost ratio (sequential).

Resumable: every finished NLL cell and every finished cost round is written to the JSON at
once and skipped when the same command runs again (the windows, seed and settings must match;
a mismatch is refused rather than mixed). The sequence phase likewise saves every chunk of
``--batch-size`` items of every cell and every cost round; a larger ``--items`` continues (the
items are a seeded prefix-stable list), other sampling settings are refused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EXPERTS = (1, 2, 3, 4, 6, 8)
ROSTERS = (1, 2, 4, 8, 16)
BASE = (4, 1)  # the model as shipped: its own k, no roster


def cell_name(k: int, K: int) -> str:
    return f"k{k}_K{K}"


def grid() -> list[tuple[int, int]]:
    """Cells in the order the NLL is scored: K ascending, so an interrupted run has whole K columns."""
    return [(k, K) for K in ROSTERS for k in EXPERTS]


# ---------------------------------------------------------------------------------------------
# the JSON document: written after every cell and every round


def load_doc(path: Path, settings: dict | None) -> dict:
    """The results so far, or a fresh document; refuses to resume with other settings (None: any)."""
    if not path.is_file():
        return {"settings": settings, "conditions": {}, "base_window_nll": None, "cells": {}, "cost_rounds": []}
    doc = json.loads(path.read_text())
    if settings is not None and doc["settings"] != settings:
        raise SystemExit(f"{path} was made with other settings:\n  {doc['settings']}\nnot\n  {settings}\n"
                         "use the same options to resume, or another --out")
    return doc


def save_doc(doc: dict, path: Path) -> None:
    """Summary rows recomputed from the raw per-window NLLs and rounds, written atomically."""
    doc["rows"] = summary_rows(doc)
    doc["equal_cost"] = equal_cost(doc)
    doc["pareto"] = [cell_name(r["k"], r["K"]) for r in pareto(doc["rows"])]
    doc["sequence_sampling"] = sequence_summary(doc.get("sequence"))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# quality: per-window NLL of a cell


def cell_window_nll(lm, k: int, K: int, windows_NW, seed: int, batch_size: int):
    """Per-window mean NLL [N]; k = 4 K = 1 is the untouched model, every other cell a roster."""
    import roe
    from roe.eval.perplexity import clean_score_fn, roster_nll, window_nll

    if (k, K) == BASE:
        return window_nll(clean_score_fn(lm), windows_NW, batch_size)
    dial = None if k == BASE[0] else k
    return roster_nll(lm, roe.RoEConfig(roster_size=K, seed=seed, experts_per_token=dial), windows_NW, batch_size)


def paired_change(nll_N: list[float], base_N: list[float]) -> tuple[float, float]:
    """Mean per-window difference and its standard error sd(delta_w) / sqrt(n)."""
    delta = [a - b for a, b in zip(nll_N, base_N, strict=True)]
    se = statistics.stdev(delta) / math.sqrt(len(delta)) if len(delta) > 1 else float("nan")
    return statistics.fmean(delta), se


def score_cells(lm, doc, windows_NW, args, path: Path, cells: list[tuple[int, int]], command: str) -> None:
    """Score the cells not yet in the document; each is saved the moment it is done."""
    for k, K in cells:
        name = cell_name(k, K)
        if name in doc["cells"]:
            continue
        t0 = time.perf_counter()
        nll_N = cell_window_nll(lm, k, K, windows_NW, args.seed, args.batch_size).tolist()
        doc["cells"][name] = {"k": k, "K": K, "window_nll": nll_N, "seconds": round(time.perf_counter() - t0, 1),
                              "finished": _now(), "command": command}
        if (k, K) == BASE:
            doc["base_window_nll"] = nll_N
        save_doc(doc, path)
        print(f"{_now()} NLL {name}: {statistics.fmean(nll_N):.5f} ({doc['cells'][name]['seconds']} s)",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# cost: interleaved rounds of decode-step timings


def cost_round(lm, prompt_P, args, index: int) -> list[dict]:
    """One round: every cell's decode step via roe.bench.measure; base first, the rest shuffled."""
    import roe
    from roe.bench import measure

    order = [c for c in grid() if c != BASE]
    random.Random(args.seed * 1000 + index).shuffle(order)
    rows = {}
    for k, K in [BASE, *order]:
        dial = None if k == BASE[0] else k
        with roe.roster(lm, roe.RoEConfig(roster_size=K, seed=args.seed, experts_per_token=dial)) as r:
            measure("roster", r, prompt_P, 2, args.time_box)  # warm-up: probing, packing the head
            rows[(k, K)] = {"k": k, **measure("roster", r, prompt_P, args.new_tokens, args.time_box).__dict__}
    return [rows[BASE], *(rows[c] for c in grid() if c != BASE)]  # canonical order, base first


def model_shape(lm) -> dict:
    """What a decode step's cost depends on, besides k and K."""
    return {key: getattr(lm.config, key) for key in ("num_experts", "num_experts_per_tok", "hidden_size",
                                                     "num_hidden_layers", "intermediate_size", "vocab_size")}


def borrowed_rounds(lm, path: Path) -> list[dict]:
    """The cost rounds of another frontier run, refused unless its model has this model's shapes."""
    other = json.loads(path.read_text())
    shape = model_shape(lm)
    if other.get("conditions", {}).get("shape") != shape or not other.get("cost_rounds"):
        raise SystemExit(f"{path}: no cost rounds of a model shaped {shape}")
    return other["cost_rounds"]


def run_rounds(lm, prompt_P, doc, args, path: Path, upto: int, command: str) -> None:
    if args.cost_from is not None:
        return
    while len(doc["cost_rounds"]) < min(upto, args.rounds):
        t0 = time.perf_counter()
        rows = cost_round(lm, prompt_P, args, len(doc["cost_rounds"]))
        doc["cost_rounds"].append({"rows": rows, "finished": _now(), "seconds": round(time.perf_counter() - t0, 1),
                                   "command": command})
        save_doc(doc, path)
        base_ms = rows[0]["decode_step_ms"]
        print(f"{_now()} cost round {len(doc['cost_rounds'])}/{args.rounds}: k4 K1 {base_ms:.2f} ms, "
              f"k8 K16 x{next(r for r in rows if (r['k'], r['K']) == (8, 16))['decode_step_ms'] / base_ms:.2f}",
              file=sys.stderr, flush=True)


def cost_summary(doc) -> dict[str, dict]:
    """Per cell: median step ms over rounds, median within-round ratio to k=4 K=1, its CI and range."""
    from roe.bench import BenchRow, combine_rounds

    rounds = doc["cost_rounds"]
    if not rounds:
        return {}
    fields = BenchRow.__dataclass_fields__
    combined = combine_rounds([[BenchRow(**{f: r[f] for f in fields}) for r in rd["rows"]] for rd in rounds])
    keys = [(r["k"], r["K"]) for r in rounds[0]["rows"]]
    return {cell_name(*key): {"step_ms": row["decode_step_ms"], "cost_ratio": row["step_ratio"],
                              "cost_ratio_ci95": row["step_ratio_ci95"], "cost_ratio_range": row["step_ratio_range"],
                              "rounds": len(rounds)}
            for key, row in zip(keys, combined, strict=True)}


# ---------------------------------------------------------------------------------------------
# summary: one row per cell, the equal-cost comparisons


def summary_rows(doc) -> list[dict]:
    base, cost = doc["base_window_nll"], cost_summary(doc)
    rows = []
    for k, K in grid():
        name = cell_name(k, K)
        cell, row = doc["cells"].get(name), {"k": k, "K": K, "nll": None, "change": None, "se": None, "z": None}
        if cell is not None and base is not None:
            change, se = paired_change(cell["window_nll"], base)
            row.update(nll=statistics.fmean(cell["window_nll"]), change=change, se=se,
                       z=change / se if se and se > 0 else None)
            same_k = doc["cells"].get(cell_name(k, 1))
            if K > 1 and same_k is not None:
                gain, gain_se = paired_change(cell["window_nll"], same_k["window_nll"])
                row.update(roe_change_at_k=gain, roe_change_at_k_se=gain_se)
            row["command"] = cell["command"]
        row.update(cost.get(name, {"step_ms": None, "cost_ratio": None}))
        rows.append(row)
    return rows


def equal_cost(doc) -> list[dict]:
    """Each RoE cell (k, K > 1) against the K = 1 cells: those with more experts (k' > k), and the
    best K = 1 cell of any k measured no dearer; every difference paired per window."""
    rows = {(r["k"], r["K"]): r for r in doc.get("rows", [])}
    single = [r for r in rows.values() if r["K"] == 1 and r["nll"] is not None and r["cost_ratio"] is not None]
    out = []
    for (k, K), r in rows.items():
        if K == 1 or r["nll"] is None or r["cost_ratio"] is None:
            continue
        versus = [{"k": s["k"], "cost_ratio": s["cost_ratio"], **against(doc, r, s)} for s in single]
        more = [v for v in versus if v["k"] > k]
        affordable = [v for v in versus if v["cost_ratio"] <= r["cost_ratio"]]
        out.append({"k": k, "K": K, "cost_ratio": r["cost_ratio"], "more_experts": more,
                    "best_affordable_more_experts": _best([v for v in more if v in affordable]),
                    "best_affordable_k1": _best(affordable)})
    return out


def against(doc, r: dict, other: dict) -> dict:
    """Cell ``r`` minus cell ``other``: paired mean per-window NLL difference, SE and z."""
    cells = doc["cells"]
    diff, se = paired_change(cells[cell_name(r["k"], r["K"])]["window_nll"],
                             cells[cell_name(other["k"], other["K"])]["window_nll"])
    return {"roe_minus_it": diff, "se": se, "z": diff / se if se else None}


def _best(versus: list[dict]) -> dict | None:
    """The comparison whose K = 1 cell has the lowest NLL (the largest RoE-minus-it)."""
    return max(versus, key=lambda v: v["roe_minus_it"]) if versus else None


def pareto(rows: list[dict]) -> list[dict]:
    """Cells no other cell beats on both cost and NLL change, by cost."""
    done = sorted((r for r in rows if r["change"] is not None and r["cost_ratio"] is not None),
                  key=lambda r: (r["cost_ratio"], r["change"]))
    front, best = [], math.inf
    for r in done:
        if r["change"] < best:
            front.append(r)
            best = r["change"]
    return front


# ---------------------------------------------------------------------------------------------
# sequence-level sampling on the last-word task: the same model spending its compute on N samples


SEQUENCE_ROSTERS = (1, 2, 4, 8)  # greedy rows at the model's own k; K = 1 is the untouched model
SEQUENCE_DEFINITION = {
    "task": "last-word (roe tasks' items from the test split; correct when the first generated word, "
            "stripped of punctuation, equals the true word)",
    "greedy": "greedy decoding at k = 4 with K in {1, 2, 4, 8} (K = 1: the untouched model; K > 1: RoE with the "
              "shipped schedule, seed 0), exactly as roe tasks scores last-word",
    "samples": "N continuations per item from the untouched model (k = 4, K = 1) by temperature sampling; "
               "sample n is drawn with RoEConfig(roster_size=1, seed=seed + n), whose seed keys only the sampling "
               "uniform; max_new_tokens tokens each (stopping at the model's eos); the first N of the same samples "
               "serve every N (nested)",
    "best_of_n": "the sample with the highest total log-likelihood of its sampled tokens under the model "
                 "(untempered log-probs, summed over the whole continuation); ties: the earliest sample",
    "majority_vote": "the most frequent non-empty first word among the N samples (an empty word is a vote only "
                     "when all are empty); ties: the tied word that appears first in sample order",
    "single_sample": "N = 1: sample 0's word (the cost of sampling without selection)",
    "not_applicable": "next-line is scored by likelihood (argmax of the summed log-likelihood over the 4 given "
                      "lines): it generates nothing, so there are no samples to rank or vote over, and ranking "
                      "candidates by likelihood is already what it does",
    "cost": "decode-step cost measured in one run (sequence cost rounds): every point is timed the same way, "
            "roster.generate on the --prompt-tokens prompt, step = interval between consecutive step callbacks "
            "(prefill and first step left out), median over --new-tokens steps; N samples are N rows of one "
            "batched decode (measured), sequential samples cost N x by construction (derived, "
            "sequential_cost_ratio); ratio to k=4 K=1 greedy within each round, median over rounds with a 95% "
            "distribution-free CI. Prefill is not counted (roe prefills each row alone, so N samples also pay N "
            "prefills)",
    "statistics": "accuracy with its per-item SE sqrt(p (1 - p) / n); change against K = 1 greedy and the "
                  "equal-cost differences paired per item: mean(d_i) and sd(d_i) / sqrt(n), d_i in {-1, 0, 1}",
}


def best_of_n(samples: list[dict]) -> str:
    """The word of the sample whose summed log-likelihood is highest (the earliest on ties)."""
    return max(samples, key=lambda s: sum(s["logprobs"]))["word"]  # max keeps the first of equals


def majority_vote(samples: list[dict]) -> str:
    """The most frequent non-empty word; ties go to the word seen first."""
    words = [s["word"] for s in samples if s["word"]] or [""]
    counts = {w: words.count(w) for w in dict.fromkeys(words)}  # insertion order = first appearance
    return max(counts, key=counts.__getitem__)


def sampled_words(r, tokenizer, items, max_new_tokens: int, temperature: float) -> list[dict]:
    """One temperature sample per item from roster ``r``: its first word and the model's
    (untempered) log-prob of every sampled token, up to and including eos."""
    import torch

    from roe.eval.tasks import first_word

    rows = [tokenizer(it.context, add_special_tokens=False).input_ids for it in items]
    pad = tokenizer.pad_token_id or 0
    width = max(map(len, rows))
    ids_BS = torch.tensor([[pad] * (width - len(ro)) + ro for ro in rows])
    mask_BS = torch.tensor([[0] * (width - len(ro)) + [1] * len(ro) for ro in rows])
    logprobs = [[] for _ in items]

    def keep(chosen_B, logprobs_BV):
        for b, lp in enumerate(logprobs_BV.gather(-1, chosen_B[:, None])[:, 0].tolist()):
            if not math.isnan(lp):  # NaN: the row had already finished
                logprobs[b].append(lp)

    out_BS = r.generate(ids_BS, mask_BS, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                        pad_token_id=pad, on_step=keep)
    texts = tokenizer.batch_decode(out_BS[:, width:], skip_special_tokens=True)
    return [{"word": first_word(t), "logprobs": lp, "tokens": out_BS[b, width : width + len(lp)].tolist()}
            for b, (t, lp) in enumerate(zip(texts, logprobs, strict=True))]


def sequence_cells(samples: int) -> list[str]:
    return [f"greedy_K{K}" for K in SEQUENCE_ROSTERS] + [f"sample_{n}" for n in range(samples)]


def sequence_chunk(lm, tokenizer, cell: str, items, s: dict) -> list:
    """Per-item records of one cell on ``items``: greedy words, or sample dicts."""
    import roe
    from roe.eval.tasks import generated_words

    if cell.startswith("greedy_K"):
        with roe.roster(lm, roe.RoEConfig(roster_size=int(cell[len("greedy_K"):]), seed=s["seed"])) as r:
            return generated_words(r, tokenizer, items, s["max_new_tokens"])
    with roe.roster(lm, roe.RoEConfig(roster_size=1, seed=s["seed"] + int(cell[len("sample_"):]))) as r:
        return sampled_words(r, tokenizer, items, s["max_new_tokens"], s["temperature"])


def sequence_step_ms(r, prompt_P, rows: int, new_tokens: int, temperature: float | None) -> float:
    """Median decode step (ms) of ``rows`` copies of the prompt decoded together by ``r.generate``
    (greedy when ``temperature`` is None): intervals between step callbacks, the first left out."""
    ticks = []
    sample = {} if temperature is None else {"do_sample": True, "temperature": temperature}
    ids_BS = prompt_P[None].expand(rows, -1)
    r.generate(ids_BS, max_new_tokens=2, eos_token_id=[], **sample)  # warm-up
    r.generate(ids_BS, max_new_tokens=new_tokens, eos_token_id=[], callback=lambda _: ticks.append(time.perf_counter()),
               **sample)
    return statistics.median(b - a for a, b in zip(ticks, ticks[1:])) * 1e3


def sequence_cost_round(lm, prompt_P, s: dict, index: int) -> dict[str, float]:
    """Step ms of every sequence point: k=4 K=1 greedy first, then RoE K and N-sample rows shuffled."""
    import roe

    points = [f"greedy_K{K}" for K in SEQUENCE_ROSTERS[1:]] + [f"samples_N{n}" for n in sequence_ns(s["samples"])]
    random.Random(s["seed"] * 1000 + 500 + index).shuffle(points)
    out = {}
    for name in ["greedy_K1", *points]:
        if name.startswith("greedy_K"):
            cfg, rows, temperature = roe.RoEConfig(roster_size=int(name[len("greedy_K"):]), seed=s["seed"]), 1, None
        else:
            cfg, rows, temperature = roe.RoEConfig(roster_size=1, seed=s["seed"]), int(name[len("samples_N"):]), \
                s["temperature"]
        with roe.roster(lm, cfg) as r:
            out[name] = sequence_step_ms(r, prompt_P, rows, s["new_tokens"], temperature)
    return out


def sequence_ns(samples: int) -> list[int]:
    """The N reported: powers of two up to the samples drawn (and that number itself)."""
    return sorted({2**i for i in range(samples.bit_length()) if 2**i <= samples} | {samples})


def run_sequence(lm, tokenizer, docs, args, path: Path, command: str, prompt_P) -> dict:
    """The --sequence phase: items in chunks of --batch-size, every cell on a chunk before the
    next chunk (so an interrupted run holds whole items), a cost round before each chunk until
    --sequence-rounds; each chunk and round saved at once and skipped on a rerun."""
    from roe.eval.tasks import last_word_items

    s = {"task": "last-word", "k": BASE[0], "seed": args.seed, "samples": args.samples,
         "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
         "context_tokens": args.context_tokens, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
         "threads": args.threads}
    doc = load_doc(path, None)  # the NLL grid's settings are not this phase's
    seq = doc.get("sequence") or {"settings": s, "items": [], "cells": {c: [] for c in sequence_cells(args.samples)},
                                  "cost_rounds": []}
    if seq["settings"] != s:
        raise SystemExit(f"{path} holds sequence results made with other settings:\n  {seq['settings']}\nnot\n  {s}")
    doc["sequence"] = seq
    items = last_word_items(docs, tokenizer, args.items, seed=args.seed, context_tokens=args.context_tokens)
    for i, it in enumerate(items[: len(seq["items"])]):
        if seq["items"][i] != {"context": it.context, "answer": it.answer}:
            raise SystemExit(f"item {i} differs from the one in {path}: other text or tokenizer")
    seq["items"] += [{"context": it.context, "answer": it.answer} for it in items[len(seq["items"]):]]
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        pending = [c for c in sequence_cells(args.samples) if len(seq["cells"][c]) < start + len(chunk)]
        if pending and len(seq["cost_rounds"]) < args.sequence_rounds:  # rounds interleaved with the work
            _sequence_round(lm, prompt_P, seq, doc, path, command)
        for cell in pending:
            done = seq["cells"][cell]
            t0 = time.perf_counter()
            done += sequence_chunk(lm, tokenizer, cell, chunk[len(done) - start :], s)
            save_doc(doc, path)
            print(f"{_now()} sequence {cell}: items {len(done)}/{len(items)} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
    while len(seq["cost_rounds"]) < args.sequence_rounds:
        _sequence_round(lm, prompt_P, seq, doc, path, command)
    save_doc(doc, path)
    return doc


def _sequence_round(lm, prompt_P, seq, doc, path: Path, command: str) -> None:
    t0 = time.perf_counter()
    step_ms = sequence_cost_round(lm, prompt_P, seq["settings"], len(seq["cost_rounds"]))
    seq["cost_rounds"].append({"step_ms": step_ms, "finished": _now(), "seconds": round(time.perf_counter() - t0, 1),
                               "command": command})
    save_doc(doc, path)
    base = step_ms["greedy_K1"]
    print(f"{_now()} sequence cost round {len(seq['cost_rounds'])}: k4 K1 {base:.2f} ms, "
          + ", ".join(f"{n} x{v / base:.2f}" for n, v in step_ms.items() if n != "greedy_K1"), file=sys.stderr,
          flush=True)


def sequence_summary(seq: dict | None) -> dict:
    """The ``sequence_sampling`` section: the definitions, one row per point on the items every
    cell has finished, the cost ratios, and the equal-cost comparisons."""
    if not seq:
        return {"status": "not run (python benchmarks/frontier.py --sequence)", "definition": SEQUENCE_DEFINITION}
    cells, s = seq["cells"], seq["settings"]
    n = min(len(v) for v in cells.values())
    if n == 0:
        return {"status": f"no item scored by every cell yet; {len(seq['cost_rounds'])} cost rounds",
                "definition": SEQUENCE_DEFINITION, "settings": s, "items": 0, "cost": sequence_cost(seq)}
    answers = [it["answer"] for it in seq["items"][:n]]
    samples = [[cells[f"sample_{j}"][i] for j in range(s["samples"])] for i in range(n)]
    picks = {f"greedy_K{K}": cells[f"greedy_K{K}"][:n] for K in SEQUENCE_ROSTERS}
    for N in sequence_ns(s["samples"]):
        if N == 1:
            picks["sample_N1"] = [ss[0]["word"] for ss in samples]
        else:
            picks[f"best_of_N{N}"] = [best_of_n(ss[:N]) for ss in samples]
            picks[f"majority_N{N}"] = [majority_vote(ss[:N]) for ss in samples]
    right = {name: [w == a for w, a in zip(words, answers, strict=True)] for name, words in picks.items()}
    cost = sequence_cost(seq)
    rows = [sequence_row(name, right[name], right["greedy_K1"], cost) for name in right]
    return {"status": f"{n} items scored by every cell; {len(seq['cost_rounds'])} cost rounds",
            "definition": SEQUENCE_DEFINITION, "settings": s, "items": n, "rows": rows,
            "equal_cost": sequence_equal_cost(rows, right)}


def sequence_row(name: str, right: list[bool], greedy: list[bool], cost: dict) -> dict:
    n = len(right)
    p = sum(right) / n
    change, se = paired_change([float(x) for x in right], [float(x) for x in greedy])
    N = int(name.rsplit("N", 1)[1]) if "_N" in name else 1
    K = int(name.rsplit("K", 1)[1]) if name.startswith("greedy_K") else 1
    key = name if name.startswith("greedy_K") else f"samples_N{N}"
    return {"point": name, "method": name.rsplit("_", 1)[0], "K": K, "N": N, "correct": sum(right),
            "accuracy": p, "accuracy_se": math.sqrt(p * (1 - p) / n),
            "change_vs_greedy_K1": change, "paired_se": se, **cost.get(key, {}),
            "sequential_cost_ratio": float(N) if not name.startswith("greedy_K") else None}


def sequence_cost(seq: dict) -> dict[str, dict]:
    """Per timed point: median step ms, median within-round ratio to k=4 K=1 greedy, its 95% CI."""
    from roe.bench import median_ci

    rounds = [rd["step_ms"] for rd in seq["cost_rounds"]]
    if not rounds:
        return {}
    out = {}
    for name in rounds[0]:
        ratios = [rd[name] / rd["greedy_K1"] for rd in rounds]
        out[name] = {"step_ms": statistics.median(rd[name] for rd in rounds), "cost_ratio": statistics.median(ratios),
                     "cost_ratio_ci95": median_ci(ratios), "cost_rounds": len(rounds)}
    return out


def sequence_equal_cost(rows: list[dict], right: dict[str, list[bool]]) -> list[dict]:
    """Each RoE K > 1 against best-of-N and majority vote at the largest N measured no dearer
    (batched samples) and at the largest N that sequential samples afford (N <= the RoE cost
    ratio, derived); differences paired per item (RoE minus it)."""
    by = {r["point"]: r for r in rows}
    out = []
    for r in rows:
        if not r["point"].startswith("greedy_K") or r["K"] == 1 or r.get("cost_ratio") is None:
            continue
        entry = {"K": r["K"], "cost_ratio": r["cost_ratio"]}
        for mode, price in (("batched", lambda q: q.get("cost_ratio")), ("sequential", lambda q: q["N"])):
            affordable = [q["N"] for q in by.values() if not q["point"].startswith("greedy_K")
                          and price(q) is not None and price(q) <= r["cost_ratio"]]
            N = max(affordable, default=None)
            entry[mode] = {"N": N, "versus": [] if N is None else [
                {"point": p, **_paired(right[r["point"]], right[p])}
                for p in (["sample_N1"] if N == 1 else [f"best_of_N{N}", f"majority_N{N}"])]}
        out.append(entry)
    return out


def _paired(ours: list[bool], theirs: list[bool]) -> dict:
    diff, se = paired_change([float(x) for x in ours], [float(x) for x in theirs])
    return {"roe_minus_it": diff, "se": se}


# ---------------------------------------------------------------------------------------------
# plot


def plot(doc, path: Path) -> None:
    """NLL change against cost ratio: one marker per k, a line per k across K, the Pareto front
    (on point estimates). Error bars: +-1 paired SE of the change; the cost ratio's 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["change"] is not None and r["cost_ratio"] is not None]
    sequence = [r for r in doc.get("sequence_sampling", {}).get("rows", []) if r.get("cost_ratio") is not None]
    fig, axes = plt.subplots(1, 2 if sequence else 1, figsize=(14 if sequence else 7.5, 5), squeeze=False)
    ax = axes[0, 0]
    for k, marker in zip(EXPERTS, "v^<os>", strict=True):
        line = sorted((r for r in rows if r["k"] == k), key=lambda r: r["K"])
        if not line:
            continue
        ci = [r.get("cost_ratio_ci95") or (r["cost_ratio"], r["cost_ratio"]) for r in line]
        xerr = [[r["cost_ratio"] - lo for r, (lo, _) in zip(line, ci, strict=True)],
                [hi - r["cost_ratio"] for r, (_, hi) in zip(line, ci, strict=True)]]
        ax.errorbar([r["cost_ratio"] for r in line], [r["change"] * 1e3 for r in line], xerr=xerr,
                    yerr=[r["se"] * 1e3 for r in line], marker=marker, capsize=2, lw=1, elinewidth=0.5,
                    label=f"k={k}")
        for r in line:
            ax.annotate(f"K{r['K']}", (r["cost_ratio"], r["change"] * 1e3), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    front = pareto(rows)
    ax.step([r["cost_ratio"] for r in front], [r["change"] * 1e3 for r in front], where="post", color="black",
            lw=2, alpha=0.35, label="Pareto frontier (point estimates)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_yscale("symlog", linthresh=2)
    ax.set_xlabel("decode-step cost, x (k=4, K=1) within a round (median over rounds)")
    ax.set_ylabel("test NLL change vs k=4 K=1 (1e-3 nats/token, symlog)")
    c = doc["conditions"]
    borrowed = f" (from {Path(c['cost']['from']).name})" if c.get("cost", {}).get("from") else ""
    ax.set_title(f"{c.get('model', 'embedded default')}, quality vs cost: {c.get('windows')} windows, "
                 f"{len(doc['cost_rounds'])} cost rounds{borrowed}, {c.get('threads')} thread", fontsize=9)
    ax.legend(fontsize=7)
    if sequence:
        plot_sequence(axes[0, 1], sequence, doc["sequence_sampling"])
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_sequence(ax, rows: list[dict], section: dict) -> None:
    """Last-word accuracy against measured cost: greedy RoE K at k = 4, best-of-N, majority vote
    and one sample (N rows decoded together); error bars +-1 paired SE against K = 1 greedy and
    the cost ratio's 95% CI."""
    lines = {"greedy": ("o-", "greedy, RoE K (k=4)", "K"), "best_of": ("s--", "best-of-N (likelihood)", "N"),
             "majority": ("^:", "majority vote", "N"), "sample": ("x", "one sample", "N")}
    for method, (style, label, key) in lines.items():
        line = sorted((r for r in rows if r["method"] == method), key=lambda r: r[key])
        if not line:
            continue
        ci = [r.get("cost_ratio_ci95") or (r["cost_ratio"], r["cost_ratio"]) for r in line]
        xerr = [[r["cost_ratio"] - lo for r, (lo, _) in zip(line, ci, strict=True)],
                [hi - r["cost_ratio"] for r, (_, hi) in zip(line, ci, strict=True)]]
        ax.errorbar([r["cost_ratio"] for r in line], [r["accuracy"] * 100 for r in line], xerr=xerr,
                    yerr=[(r["paired_se"] or 0) * 100 for r in line], fmt=style, capsize=2, lw=1, elinewidth=0.5,
                    label=label)
        for r in line:
            ax.annotate(f"{key}{r[key]}", (r["cost_ratio"], r["accuracy"] * 100), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    best, front = -math.inf, []
    for r in sorted(rows, key=lambda r: (r["cost_ratio"], -r["accuracy"])):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    ax.step([r["cost_ratio"] for r in front], [r["accuracy"] * 100 for r in front], where="post", color="black",
            lw=2, alpha=0.35, label="Pareto frontier (point estimates)")
    s = section["settings"]
    ax.set_xlabel("decode-step cost, x (k=4, K=1 greedy) within a round; N samples as N batched rows")
    ax.set_ylabel("last-word accuracy (%), error bar: paired SE vs K=1 greedy")
    ax.set_title(f"sequence-level sampling: {section['items']} items, T={s['temperature']}, "
                 f"{len([r for r in rows if r['method'] == 'greedy'])} RoE points", fontsize=9)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------
# the run


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def conditions(lm, windows_NW, args, prompt_P) -> dict:
    import platform

    import torch
    import transformers

    schedule = ("roe/assets/default/schedule.json (shipped)" if args.model is None else
                f"{args.model}/schedule.json" if Path(args.model, "schedule.json").is_file() else "uniform 0.1")
    shape = model_shape(lm)
    return {"model": args.model or "embedded default", "experts": lm.config.num_experts, "shape": shape,
            "model_k": lm.config.num_experts_per_tok, "text": "roe/assets/default/data/test.txt.gz",
            "windows": len(windows_NW), "window_tokens": args.window,
            "tokens": int(windows_NW[:, 1:].numel()), "schedule": schedule,
            "seed": args.seed, "dtype": "float32", "threads": torch.get_num_threads(),
            "cost": {"method": "roster (roe.bench.measure)", "prompt_tokens": len(prompt_P),
                     "new_tokens": args.new_tokens, "time_box_s": args.time_box, "rounds_planned": args.rounds,
                     "ratio": "to k=4 K=1 within each round, median over rounds"},
            "machine": f"{platform.machine()}, 2 cores shared with other jobs (a niced 1-thread training job and "
                       "other agents' tests); absolute ms are noisy, read the within-round ratios",
            "torch": torch.__version__, "transformers": transformers.__version__}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a checkpoint directory with the default model's tokenizer "
                   "(default: the embedded model); its schedule.json, else uniform 0.1, as roe's default")
    p.add_argument("--cost-from", type=Path, default=None,
                   help="take the cost rounds from this frontier JSON instead of timing them (a checkpoint of the "
                        "same architecture: a step's cost depends on the shapes, k and K, not on the weights)")
    p.add_argument("--windows", type=int, default=32, help="test windows scored by every cell")
    p.add_argument("--window", type=int, default=256, help="predicted tokens per window")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--rounds", type=int, default=8, help="cost rounds (interleaved with the NLL cells)")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps per cell per round")
    p.add_argument("--time-box", type=float, default=4.0, help="seconds per cell per round at most")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "frontier.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "frontier.png")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot (and summary) from --out")
    p.add_argument("--sequence", action="store_true",
                   help="the sequence-sampling phase on last-word (greedy RoE K vs best-of-N / majority vote)")
    p.add_argument("--items", type=int, default=200, help="--sequence: last-word items (a larger number resumes)")
    p.add_argument("--samples", type=int, default=8, help="--sequence: samples per item (N up to this)")
    p.add_argument("--temperature", type=float, default=0.7, help="--sequence: sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=6, help="--sequence: tokens per continuation (as roe tasks)")
    p.add_argument("--context-tokens", type=int, default=200, help="--sequence: item context (as roe tasks)")
    p.add_argument("--sequence-rounds", type=int, default=8, help="--sequence: cost rounds")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = {"windows": args.windows, "window": args.window, "seed": args.seed, "new_tokens": args.new_tokens,
                "prompt_tokens": args.prompt_tokens, "threads": args.threads,
                **({"model": args.model} if args.model else {})}  # NOTE: runs made before --model resume
    if args.plot_only:
        doc = json.loads(args.out.read_text())
        save_doc(doc, args.out)
        plot(doc, args.plot)
        return
    import numpy as np
    import torch

    import roe
    from roe.eval.perplexity import make_windows, text_tokens
    from roe.kernels import prepare as prepare_kernels
    from roe.loading import default_split_path

    torch.set_num_threads(args.threads)
    command = "python benchmarks/frontier.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    doc = load_doc(args.out, None if args.sequence else settings)
    lm, tokenizer = roe.load(args.model)
    tokens = text_tokens(tokenizer, default_split_path("test"))
    if args.sequence:
        from roe.eval.tasks import read_documents

        prepare_kernels()
        doc = run_sequence(lm, tokenizer, read_documents(default_split_path("test")), args, args.out, command,
                           torch.from_numpy(tokens[: args.prompt_tokens]))
        plot(doc, args.plot)
        print(json.dumps(doc["sequence_sampling"]))
        return
    windows = make_windows(tokens, args.window)
    windows = windows[np.linspace(0, len(windows) - 1, args.windows).astype(int)]
    prompt_P = torch.from_numpy(tokens[: args.prompt_tokens])
    prepare_kernels()  # compiled or loaded now, not inside a timed round
    doc["conditions"] = conditions(lm, windows, args, prompt_P)
    if args.cost_from is not None:
        doc["cost_rounds"] = borrowed_rounds(lm, args.cost_from)
        doc["conditions"]["cost"]["from"] = str(args.cost_from)
    for i, K in enumerate(ROSTERS):  # a cost round before each K column of NLL cells, the rest at the end
        run_rounds(lm, prompt_P, doc, args, args.out, i + 1, command)
        score_cells(lm, doc, windows, args, args.out, [(k, K_) for k, K_ in grid() if K_ == K], command)
        plot(doc, args.plot)
    run_rounds(lm, prompt_P, doc, args, args.out, args.rounds, command)
    save_doc(doc, args.out)
    plot(doc, args.plot)
    print(json.dumps({"rows": doc["rows"], "equal_cost": doc["equal_cost"], "conditions": doc["conditions"]}))


if __name__ == "__main__":
    main()
