"""Equivalent size, measured (issue 20): an OLMoE family trained identically, to place RoE on its curve.

    python benchmarks/equivalent_size.py speed [--seconds 60] [--hours 10]   # s/step of each member, the budget
    python benchmarks/equivalent_size.py train [--until HH:MM]               # train the family; re-run to resume
    python benchmarks/equivalent_size.py status                              # how far each member got
    python benchmarks/equivalent_size.py evaluate [--members d256,...]       # per-window NLL; RoE-K on the 1x member
    python benchmarks/equivalent_size.py fit                                 # NLL against size, RoE's equivalent size
    python benchmarks/equivalent_size.py latency [--rounds 5]                # decode step of each member and RoE-K
    python benchmarks/equivalent_size.py report                              # the JSON and the plot of the result

The family is the default model's architecture (``OlmoeForCausalLM``, 6 layers, 32 experts,
top-4, tied embeddings, vocab 8192) scaled in width the way Mixtral 8x7B -> 8x22B and the Qwen3
MoE sizes scale: hidden size in steps of one 64-wide attention head, expert width kept at
0.375 x hidden, expert count and top-k fixed, so every member has the same active fraction of its
expert parameters (4 of 32). ``d256`` is the default model's exact shape. Every member uses the
same data (``data/tokens``, encoded with the shipped tokenizer ``roe/assets/default``), the same
recipe and the same token budget (``TOTAL_STEPS`` x 16 x 256 tokens, cosine over steps: see
``tools.train --total-steps``), so sizes differ in parameters only.

``train`` runs the members one after another (``python -m tools.train --resume`` in a child
process, output appended to ``runs/family/<member>/train.log``); a member that is finished is
skipped, one that was interrupted continues from its checkpoint, and an interrupted-and-resumed
run takes exactly the steps of an uninterrupted one. SIGTERM to the driver is passed to the
child, which checkpoints at the next step boundary; the driver then stops. After each member
(finished or not) its deduplicated log and parameter counts go to
``benchmarks/results/family/<member>.json`` (committed; checkpoints stay in ``runs/``, gitignored).
The recipe, the measured speeds and the budget's arithmetic: ``benchmarks/equivalent_size.md``.

``evaluate``, ``latency`` (``equivalent_size_measure``), ``fit`` and ``report``
(``equivalent_size_fit``) measure the finished family and place RoE on it; their per-member
results are cached under ``benchmarks/results/equivalent_size/``, so each resumes where it stopped.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # NOTE: tools/ (the training pipeline) runs from the repository; it is not installed
    sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "tokens"
TOKENIZER = ROOT / "roe" / "assets" / "default"
RUNS = ROOT / "runs" / "family"
RESULTS = ROOT / "benchmarks" / "results" / "family"
MEASURED = ROOT / "benchmarks" / "results" / "equivalent_size"  # per-window units, schedule, latency rounds, fit
ONE_X = "d256"  # the default model's shape: RoE runs on it
VOCAB = 8192  # the shipped tokenizer's vocabulary: every member's

# NOTE: fixed once from the measured speeds (benchmarks/results/family/speed.json) so that the
# whole family fits in about ten hours of 1-thread training; changing it would make the runs
# already under way incomparable, and `train` refuses a run directory made with another recipe.
TOTAL_STEPS = 1300
RECIPE = dict(preset="e32k4", num_layers=6, seq_len=256, batch_size=16, lr=1.5e-3, min_lr_ratio=0.1,
              warmup_steps=50, weight_decay=0.1, aux_loss_coef=0.01, seed=0, eval_every_min=5.0,
              ckpt_every_min=4.0, eval_windows=64)


@dataclass(frozen=True, kw_only=True)
class Member:
    """One width of the family: 64-wide attention heads, experts 3/8 as wide as the hidden size."""

    name: str
    hidden_size: int
    seed: int = RECIPE["seed"]  # another seed is a second run of the same size: training noise (`train --seed`)

    @property
    def run_dir(self) -> Path:
        """runs/family/<name>; another seed's run: runs/seed<seed>/<name> (`evaluate --runs runs/seed<seed>`)."""
        return RUNS / self.name if self.seed == RECIPE["seed"] else RUNS.parent / f"seed{self.seed}" / self.name

    @property
    def label(self) -> str:
        return self.name if self.seed == RECIPE["seed"] else f"{self.name}-seed{self.seed}"

    @property
    def num_heads(self) -> int:
        return self.hidden_size // 64

    @property
    def intermediate_size(self) -> int:
        return self.hidden_size * 3 // 8

    def config(self, total_steps: int = TOTAL_STEPS):
        from tools.train import TrainConfig

        return TrainConfig(**{**RECIPE, "seed": self.seed}, hidden_size=self.hidden_size, num_heads=self.num_heads,
                           intermediate_size=self.intermediate_size, total_steps=total_steps)


# NOTE: training order, not size order: the 1x model first (the RoE experiments need it), then
# the ends of the range (a first fit needs them), then the rest.
FAMILY = [Member(name=f"d{h}", hidden_size=h) for h in (256, 192, 384, 320, 128)]


def parameter_counts(member: Member) -> dict:
    """Total, active (top-k of the experts) and embedding parameters of a member, counted on the model."""
    import torch

    from tools.train import build_model

    cfg = member.config()
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=VOCAB, eos_id=0)
    k_over_e = model.config.num_experts_per_tok / model.config.num_experts
    total = expert = embedding = 0
    for name, param in model.named_parameters():
        total += param.numel()
        expert += param.numel() if ".experts." in name else 0
        embedding += param.numel() if "embed_tokens" in name else 0
    return {"params": total, "active_params": round(total - expert + expert * k_over_e),
            "embedding_params": embedding, "expert_params": expert}


# -- speed ----------------------------------------------------------------------------------------

def step_seconds(member: Member, seconds: float, warmup: int = 2) -> tuple[list[float], list[float]]:
    """Wall and CPU time of training steps exactly as tools.train takes them, for ``seconds`` after warm-up.

    NOTE: the budget is set from CPU time: with one thread it is the wall time the step takes on
    a core of its own, and it barely moves when other jobs share the machine (wall time does).
    """
    import numpy as np

    from tools import train

    cfg = member.config()
    tokens = np.fromfile(DATA / "train.bin", dtype=np.uint16)
    model = train.build_model(cfg, vocab_size=VOCAB, eos_id=0).train()
    optimizer = train.make_optimizer(model, cfg)
    wall, cpu, start = [], [], time.perf_counter()
    for step in range(10_000):
        t0, c0 = time.perf_counter(), time.process_time()
        train.train_step(model, optimizer, train.batch_at(tokens, cfg, step), train.lr_at(cfg, step, 0.0))
        if step >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        if step >= warmup + 3 and time.perf_counter() - start > seconds:
            break
    return wall, cpu


def speed(seconds: float, hours: float, threads: int) -> dict:
    """Median CPU s/step of every member, and the per-member step budget that fits the family in ``hours``."""
    import torch

    torch.set_num_threads(threads)
    tokens_per_step = RECIPE["batch_size"] * RECIPE["seq_len"]
    rows = []
    for member in sorted(FAMILY, key=lambda m: m.hidden_size):
        wall, cpu = step_seconds(member, seconds)
        cpu_step = statistics.median(cpu)
        row = {"member": member.name, "hidden_size": member.hidden_size, **parameter_counts(member),
               "steps_timed": len(wall), "cpu_s_per_step": round(cpu_step, 3),
               "cpu_s_per_step_range": [round(min(cpu), 3), round(max(cpu), 3)],
               "wall_s_per_step": round(statistics.median(wall), 3),
               "tokens_per_cpu_s": round(tokens_per_step / cpu_step)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    family_s_per_step = sum(r["cpu_s_per_step"] for r in rows)
    steps = int(hours * 3600 / family_s_per_step)
    return {"conditions": conditions(threads), "seconds_per_member": seconds, "hours": hours, "members": rows,
            "family_s_per_step": round(family_s_per_step, 3), "steps_that_fit": steps,
            "tokens_that_fit": steps * tokens_per_step}


def markdown_table(doc: dict, total_steps: int = TOTAL_STEPS) -> str:
    """The family table of benchmarks/equivalent_size.md, from a speed document."""
    default = next(r["params"] for r in doc["members"] if r["member"] == "d256")
    tokens = total_steps * RECIPE["batch_size"] * RECIPE["seq_len"]
    lines = ["| member | hidden / heads / expert width | params | x default | active params | tokens "
             "| CPU s/step (1 thread) | tokens/s | expected hours |", "|" + " --- |" * 9]
    for r in doc["members"]:
        m = next(m for m in FAMILY if m.name == r["member"])
        hours = total_steps * r["cpu_s_per_step"] / 3600
        lines.append(f"| {m.name} | {m.hidden_size} / {m.num_heads} / {m.intermediate_size} "
                     f"| {r['params'] / 1e6:.2f} M | {r['params'] / default:.2f} | {r['active_params'] / 1e6:.2f} M "
                     f"| {tokens / 1e6:.2f} M | {r['cpu_s_per_step']:.2f} | {r['tokens_per_cpu_s']:,} | {hours:.2f} |")
    hours = total_steps * doc["family_s_per_step"] / 3600
    lines.append(f"| family | | | | | {len(doc['members']) * tokens / 1e6:.1f} M | {doc['family_s_per_step']:.2f} | "
                 f"| {hours:.2f} |")
    return "\n".join(lines)


def conditions(threads: int) -> dict:
    import platform

    import torch

    return {"threads": threads, "nice": os.nice(0), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__, "python": platform.python_version(), "dtype": "float32",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# -- train ----------------------------------------------------------------------------------------

def train_args(member: Member, threads: int) -> list[str]:
    """The tools.train command line of a member (always --resume: a re-run continues)."""
    args = [sys.executable, "-m", "tools.train", "--data", str(DATA), "--tokenizer", str(TOKENIZER),
            "--out", str(member.run_dir), "--resume", "--threads", str(threads)]
    for field, value in asdict(member.config()).items():
        args += [f"--{field.replace('_', '-')}", str(value)]
    return args


def check_recipe(member: Member) -> None:
    """Refuse a run directory started with another recipe (its schedule would silently change)."""
    run = member.run_dir
    recipe = run / "recipe.json"
    wanted = asdict(member.config())
    if recipe.exists():
        found = json.loads(recipe.read_text())
        if found != wanted:
            diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
            raise SystemExit(f"{run} was started with another recipe (found, wanted): {diff}; move it away")
    else:
        run.mkdir(parents=True, exist_ok=True)
        recipe.write_text(json.dumps(wanted, indent=1) + "\n")


def run_records(member: Member) -> list[dict]:
    """The run's log.jsonl with each step once: a resumed run logs again the steps after its last checkpoint."""
    path = member.run_dir / "log.jsonl"
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        by_step[record["step"]] = {**by_step.get(record["step"], {}), **record}
    return [by_step[s] for s in sorted(by_step)]


def finished(member: Member) -> bool:
    records = run_records(member)
    final = member.run_dir / "final" / "model.safetensors"
    return final.exists() and bool(records) and records[-1]["step"] >= TOTAL_STEPS


def export(member: Member, threads: int) -> dict:
    """benchmarks/results/family/<member>.json: recipe, parameter counts, progress and the whole log."""
    records = run_records(member)
    vals = [r for r in records if "val_loss" in r]
    last = records[-1] if records else {"step": 0, "min": 0.0, "tokens": 0}
    doc = {"member": member.name, **({"seed": member.seed} if member.label != member.name else {}),
           "hidden_size": member.hidden_size, "num_heads": member.num_heads,
           "intermediate_size": member.intermediate_size, **parameter_counts(member),
           "recipe": asdict(member.config()), "token_budget": TOTAL_STEPS * RECIPE["batch_size"] * RECIPE["seq_len"],
           "finished": finished(member), "steps_done": last["step"], "tokens_seen": last["tokens"],
           "train_minutes": last["min"],
           "s_per_step": round(60 * last["min"] / last["step"], 3) if last["step"] else None,
           "final_val_loss": vals[-1]["val_loss"] if vals else None, "threads": threads, "log": records}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{member.label}.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def utc_deadline(hhmm: str) -> float:
    """The next HH:MM UTC as a Unix time (the driver's --until): tomorrow's when today's has passed,
    so a deadline after midnight given before it is not taken as already gone."""
    hours, minutes = (int(x) for x in hhmm.split(":"))
    today = time.gmtime()
    deadline = calendar.timegm((today.tm_year, today.tm_mon, today.tm_mday, hours, minutes, 0))
    return deadline if deadline > time.time() else deadline + 24 * 3600


def train_member(member: Member, threads: int, deadline: float | None) -> int:
    """Run (or continue) one member in a child process until it ends or the deadline; returns its exit code.

    SIGTERM to the driver, or the deadline, sends SIGTERM to the child, which checkpoints the step
    under way and exits 143 (or dies at once, losing nothing, if it was still loading).
    """
    check_recipe(member)
    log = (member.run_dir / "train.log").open("a")
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} launch\n")
    log.flush()
    child = subprocess.Popen(train_args(member, threads), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                return child.wait(timeout=None if deadline is None else max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                print(f"{time.strftime('%H:%M:%S')} {member.label}: deadline, stopping at the next step", flush=True)
                child.send_signal(signal.SIGTERM)
                deadline = None
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_family(threads: int, deadline: float | None = None, members: str | None = None,
                 seed: int | None = None) -> int:
    """Train the family (or ``members``, comma-separated: e.g. one driver per core) in FAMILY's order; with
    ``seed``, second runs of them with that seed instead (``Member.run_dir``)."""
    family = FAMILY
    if members:
        names = members.split(",")
        unknown = sorted(set(names) - {m.name for m in FAMILY})
        if unknown:
            raise SystemExit(f"--members: {', '.join(unknown)} not in the family ({', '.join(m.name for m in FAMILY)})")
        family = [m for m in FAMILY if m.name in names]
    if seed is not None:
        family = [replace(m, seed=seed) for m in family]
    if not (DATA / "train.bin").exists():
        raise SystemExit(f"no {DATA}/train.bin: python -m tools.corpus --out data/corpus && python -m "
                         "tools.tokenizer --corpus data/corpus --existing roe/assets/default --out data/tokenizer "
                         "--encode --tokens data/tokens")
    for member in family:
        if finished(member):
            print(f"{member.label}: finished", flush=True)
            if not (RESULTS / f"{member.label}.json").exists():
                export(member, threads)
            continue
        if deadline is not None and time.time() >= deadline:
            print(f"{time.strftime('%H:%M:%S')} deadline: {member.label} not started", flush=True)
            return 0
        print(f"{time.strftime('%H:%M:%S')} {member.label}: training (log: {member.run_dir / 'train.log'})",
              flush=True)
        code = train_member(member, threads, deadline)
        doc = export(member, threads)
        print(f"{time.strftime('%H:%M:%S')} {member.label}: exit {code}, step {doc['steps_done']}/{TOTAL_STEPS}, "
              f"val {doc['final_val_loss']}", flush=True)
        if code != 0:
            return code
    return 0


def status() -> None:
    print(f"budget: {TOTAL_STEPS} steps x {RECIPE['batch_size']} x {RECIPE['seq_len']} = "
          f"{TOTAL_STEPS * RECIPE['batch_size'] * RECIPE['seq_len'] / 1e6:.2f} M tokens per member")
    for member in FAMILY:
        records = run_records(member)
        last = records[-1] if records else {"step": 0, "min": 0.0}
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        left = (TOTAL_STEPS - last["step"]) * last["min"] / last["step"] / 60 if last["step"] else None
        print(f"{member.name}: step {last['step']}/{TOTAL_STEPS}, {last['min']:.1f} min, "
              f"val {vals[-1] if vals else '-'}, finished {finished(member)}"
              + (f", about {left:.1f} h left at its pace" if left is not None and not finished(member) else ""))


# -- evaluate, fit, latency, report ---------------------------------------------------------------

def by_size(names: list[str]) -> list[str]:
    """Family members in size order; names outside the family (tests' tiny members) keep their order."""
    sizes = {m.name: m.hidden_size for m in FAMILY}
    return sorted(names, key=lambda n: sizes.get(n, 0)) if all(n in sizes for n in names) else names


def chosen_members(members: str | None, runs: Path, allow_unfinished: bool) -> list[str]:
    """--members a,b (each must be ready: refused otherwise), else every finished member of the family."""
    from benchmarks import equivalent_size_measure as measure

    if members:
        return by_size([n.strip() for n in members.split(",") if n.strip()])
    ready = [m.name for m in FAMILY if not measure.missing_members(runs, [m.name], allow_unfinished)]
    if not ready:
        raise SystemExit(f"no finished member in {runs}: train the family first (`status` shows how far it got)")
    return by_size(ready)


def default_split(split: str) -> Path:
    """The embedded model's held-out text: the family shares its tokenizer and corpus."""
    from roe.loading import default_split_path

    return default_split_path(split)


def parse_list(text: str, kind=int) -> tuple:
    return tuple(kind(v) for v in text.split(",") if v.strip())


def run_evaluate(args) -> None:
    from benchmarks import equivalent_size_measure as measure

    torch_threads(args.threads)
    names = chosen_members(args.members, args.runs, args.allow_unfinished)
    texts = measure.Texts(test=args.test_text or default_split("test"), unseen=args.unseen_text,
                          validation=args.validation_text or default_split("validation"))
    settings = measure.EvalSettings(window=args.window, max_windows=args.max_windows, calib_windows=args.calib_windows,
                                    calib_K=args.calib_k, grid=parse_list(args.grid, float), tpe_trials=args.tpe_trials,
                                    ks=parse_list(args.ks), seed=args.seed, batch_size=args.batch_size)
    measure.evaluate(args.runs, names, args.one_x, texts, args.tokenizer, args.results, settings,
                     args.allow_unfinished)
    print(f"evaluated {names} (RoE on {args.one_x} if among them); units in {args.results}")


def run_fit(args) -> dict:
    from benchmarks import equivalent_size_fit as fit

    names = by_size([n.strip() for n in args.members.split(",")]) if args.members else by_size(
        [m.name for m in FAMILY])
    variants = dict(parse_named_dir(v) for v in args.variant)
    replicates = dict(parse_named_dir(v, "--replicate", "d128=benchmarks/results/equivalent_size_seed1",
                                    "a second run of the member") for v in args.replicate)
    doc = fit.fit_all(args.results, names, args.one_x, sorted({1, *parse_list(args.ks)}), args.resamples, args.seed,
                      variants, replicates)
    measure_write(args.results / "fit.json", doc)
    for text, part in doc["texts"].items():
        for axis, fitted in part["axes"].items():
            curve = fitted["curves"][fitted["chosen"]]
            print(f"{text} / {axis}: {fitted['chosen']} {curve['params']} (AICc {fitted['aicc']})")
            for member, again in curve["replicates"].items():
                print(f"  a second run of {member}: equivalent {again['equivalent_again']:.4g} against "
                      f"{again['equivalent_first']:.4g}, ratio {again['ratio']:.3f} "
                      f"[{again['ratio_ci95'][0]:.3f}, {again['ratio_ci95'][1]:.3f}]")
            for p in curve["points"] + [{**q, "K": f"{name} K={q['K']}"} for name, points in curve["variants"].items()
                                        for q in points]:
                print(f"  K={p['K']:<3} nll {p['nll']:.5f}  equivalent {p['equivalent']:.4g} "
                      f"[{p['ci95'][0]:.4g}, {p['ci95'][1]:.4g}]  x1x {p['ratio_to_1x']:.3f} "
                      f"[{p['ratio_to_1x_ci95'][0]:.3f}, {p['ratio_to_1x_ci95'][1]:.3f}]"
                      + {True: "  EXTRAPOLATED", False: "", None: "  UNDEFINED (the fit does not fall with size)"}[
                          p["extrapolated"]])
    return doc


def parse_named_dir(text: str, option: str = "--variant", example: str = "roe-aware=benchmarks/results/"
                  "equivalent_size_roe_aware", what: str = "the fine-tuned 1x") -> tuple[str, Path]:
    """NAME=DIR (``--variant``, ``--replicate``): the folder of another model's own ``evaluate --results DIR``."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise SystemExit(f"{option} takes NAME=DIR (e.g. {example}), got {text!r}")
    if not Path(folder).is_dir():
        raise SystemExit(f"{option} {name}: no folder {folder} (evaluate {what} with --results {folder})")
    return name, Path(folder)


def initialised(name: str, eos_id: int):
    """A family member as ``train`` starts it (its recipe's seed), untrained: ``latency --weights init``."""
    from benchmarks.equivalent_size_measure import member_model

    shapes = {m.name: m for m in FAMILY}
    if name not in shapes:
        raise SystemExit(f"--weights init: {name} is not in the family ({', '.join(shapes)})")
    return member_model(shapes[name].config(), VOCAB, eos_id)


def run_latency(args) -> dict:
    from benchmarks import equivalent_size_measure as measure

    names = by_size([n.strip() for n in args.members.split(",")]) if args.members else by_size(
        [m.name for m in FAMILY])
    doc = measure.latency(args.runs, names, args.one_x, args.results, args.tokenizer,
                          args.prompt_text or default_split("test"),
                          ks=parse_list(args.ks), batches=parse_list(args.batches), rounds=args.rounds,
                          steps=args.steps, prompt_tokens=args.prompt_tokens, threads=args.threads,
                          kernels=not args.no_kernels, allow_unfinished=args.allow_unfinished,
                          init=initialised if args.weights == "init" else None, schedule=args.schedule)
    for key, row in doc["configs"].items():
        print(f"{key:22s} {row['step_ms']:8.2f} ms  95% CI {row['ci95_ms']}  ({row['steps']} steps)")
    return doc


def run_report(args) -> dict:
    from benchmarks import equivalent_size_fit as fit
    from benchmarks import equivalent_size_measure as measure

    needed = {"fit.json": "fit", "latency.json": "latency"}
    absent = [f"{name} (run `{cmd}`)" for name, cmd in needed.items() if not (args.results / name).is_file()]
    if absent:
        raise SystemExit(f"missing in {args.results}: {', '.join(absent)}")
    fitted = json.loads((args.results / "fit.json").read_text())
    timing = measure.summarise_latency(json.loads((args.results / "latency.json").read_text()))
    doc = fit.report(fitted, timing)
    shapes = {m.name: m for m in FAMILY}
    for row in doc["family"]:  # the architecture of each size (tests' tiny members have none here)
        if row["member"] in shapes:
            m = shapes[row["member"]]
            row.update(hidden_size=m.hidden_size, num_heads=m.num_heads, expert_width=m.intermediate_size,
                       train_tokens=TOTAL_STEPS * RECIPE["batch_size"] * RECIPE["seq_len"])
    fit.plot(fitted, doc, args.png)
    doc = fit.strict_json(doc)
    measure_write(args.json, doc)
    print(f"wrote {args.json} and {args.png}")
    print(json.dumps(doc))
    return doc


def measure_write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def add_measure_options(parser, *, members_help: str) -> None:
    parser.add_argument("--members", default=None, help=members_help)
    parser.add_argument("--one-x", default=ONE_X, help="the member RoE runs on (default %(default)s)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the members' checkpoints are")
    parser.add_argument("--results", type=Path, default=MEASURED, help="per-member results (cached, resumable)")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument("--ks", default="1,2,4,8,16,32", help="RoE roster sizes on the 1x member")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="use members not trained to the end (a look, not a result; their step is recorded)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_speed = sub.add_parser("speed", help="time training steps of every member and compute the budget")
    p_speed.add_argument("--seconds", type=float, default=60.0)
    p_speed.add_argument("--hours", type=float, default=10.0)
    p_speed.add_argument("--threads", type=int, default=1)
    p_speed.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    p_train = sub.add_parser("train", help="train the family, one member after another (re-run to resume)")
    p_train.add_argument("--threads", type=int, default=1)
    p_train.add_argument("--until", default=None, metavar="HH:MM",
                         help="stop (checkpointed) at the next such UTC time, e.g. before the session ends")
    p_train.add_argument("--members", default=None,
                         help="comma-separated members to train (default: the whole family, in its order)")
    p_train.add_argument("--seed", type=int, default=None,
                         help=f"a second run with another seed (the recipe's is {RECIPE['seed']}): in runs/seed<N>/, "
                              "its log in benchmarks/results/family/<member>-seed<N>.json")
    sub.add_parser("status", help="how far each member got")
    p_eval = sub.add_parser("evaluate", help="per-window NLL of every member; tau calibration and RoE-K on the 1x")
    add_measure_options(p_eval, members_help="comma-separated (each must be finished); default: every finished one")
    p_eval.add_argument("--test-text", type=Path, default=None, help="default: the embedded test split")
    p_eval.add_argument("--unseen-text", type=Path, default=ROOT / "data" / "unseen.txt")
    p_eval.add_argument("--validation-text", type=Path, default=None, help="default: the embedded validation split")
    p_eval.add_argument("--window", type=int, default=256)
    p_eval.add_argument("--max-windows", type=int, default=400, help="per scored text, spread evenly")
    p_eval.add_argument("--calib-windows", type=int, default=100, help="validation windows of the tau search")
    p_eval.add_argument("--calib-k", type=int, default=8, help="roster size the tau search is run at")
    p_eval.add_argument("--grid", default="0,0.02,0.05,0.08,0.1,0.15,0.2,0.3", help="uniform tau grid (App. B)")
    p_eval.add_argument("--tpe-trials", type=int, default=1,
                        help="TPE trials after the grid (1: only the best grid point, i.e. the grid alone)")
    p_eval.add_argument("--seed", type=int, default=0)
    p_eval.add_argument("--batch-size", type=int, default=4)
    p_fit = sub.add_parser("fit", help="NLL against size with bootstrap intervals; RoE-K's equivalent size")
    add_measure_options(p_fit, members_help="comma-separated; default: the whole family (refused if one is missing)")
    p_fit.add_argument("--resamples", type=int, default=2000)
    p_fit.add_argument("--seed", type=int, default=0)
    p_fit.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                       help="a fine-tuned 1x evaluated into DIR (evaluate --runs ... --results DIR), placed on the "
                            "family's curve at every K (repeatable: RoE-aware training and its control)")
    p_fit.add_argument("--replicate", action="append", default=[], metavar="MEMBER=DIR",
                       help="a second training run of MEMBER (another seed) evaluated into DIR at K = 1: where it "
                            "lands on the curve against the first run (training noise; repeatable)")
    p_lat = sub.add_parser("latency", help="decode step of every member at K=1 and of RoE-K on the 1x, one process")
    add_measure_options(p_lat, members_help="comma-separated; default: the whole family (refused if one is missing)")
    p_lat.add_argument("--rounds", type=int, default=5)
    p_lat.add_argument("--steps", type=int, default=16, help="timed decode steps per configuration and round")
    p_lat.add_argument("--batches", default="1,8")
    p_lat.add_argument("--prompt-tokens", type=int, default=128)
    p_lat.add_argument("--prompt-text", type=Path, default=None, help="default: the embedded test split")
    p_lat.add_argument("--no-kernels", action="store_true")
    p_lat.add_argument("--weights", choices=("checkpoint", "init"), default="checkpoint",
                       help="time the trained checkpoints, or the members as initialised (no checkpoint needed: "
                            "the same arithmetic per step, only the router's choices differ)")
    p_lat.add_argument("--schedule", type=Path, default=None,
                       help="RoE temperatures (default: RESULTS/schedule_<one-x>.json, from `evaluate`)")
    p_rep = sub.add_parser("report", help="benchmarks/results/equivalent_size.json and .png from fit and latency")
    p_rep.add_argument("--results", type=Path, default=MEASURED)
    p_rep.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "equivalent_size.json")
    p_rep.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "results" / "equivalent_size.png")
    args = parser.parse_args(argv)
    if args.command == "speed":
        doc = speed(args.seconds, args.hours, args.threads)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(markdown_table(doc, doc["steps_that_fit"]))
        print(json.dumps(doc))
    elif args.command == "train":
        raise SystemExit(train_family(args.threads, args.until and utc_deadline(args.until), args.members, args.seed))
    elif args.command == "status":
        status()
    else:
        {"evaluate": run_evaluate, "fit": run_fit, "latency": run_latency, "report": run_report}[args.command](args)


if __name__ == "__main__":
    main()
