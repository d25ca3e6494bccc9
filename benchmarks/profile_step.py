"""Where a roster decode step spends its time: torch.profiler over greedy steps, by category.

Loads a model (default: the embedded one), prefills a --prompt-tokens prompt from the test split,
then profiles --steps decode steps of the ``roster`` method at each K. Prints, per K, the median
step time, the share of each category of work (attention, experts, router + RoE noise, KV cache,
masks, LM head + aggregation, the rest) and the top operators by self CPU time. The last line is
one JSON document.

    python benchmarks/profile_step.py --ks 1,8,32 --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import roe
from roe.bench import RosterMethod
from roe.cli import _bench_prompt
from roe.loading import load

# Stage markers placed with record_function by the profiling hooks below.
STAGES = ("attention", "experts", "router", "lm_head")


def _hooks(model):
    """Wrap decoder sub-modules in record_function scopes (removed afterwards)."""
    handles = []

    def scope(module, name):
        ctx = {}

        def pre(_m, _a, _k=None):
            ctx["r"] = record_function(name)
            ctx["r"].__enter__()

        def post(_m, _a, _o, _k=None):
            ctx.pop("r").__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for layer in model.model.layers:
        scope(layer.self_attn, "attention")
        scope(layer.mlp.experts, "experts")
        scope(layer.mlp.gate, "router")
    scope(model.lm_head, "lm_head")
    return handles


def profile_k(lm, prompt, K: int, steps: int, top: int):
    cfg = roe.RoEConfig(roster_size=K, tau=roe.loading.default_schedule_path() if K > 1 else 0.0)
    with roe.roster(lm, cfg) as r:
        method = RosterMethod(r)
        token = method.start(prompt).argmax()
        for _ in range(3):
            token = method.step(token).argmax()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            token = method.step(token).argmax()
            times.append(time.perf_counter() - t)
        handles = _hooks(lm)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    with record_function("step"):
                        token = method.step(token).argmax()
        finally:
            for h in handles:
                h.remove()
    events = prof.key_averages()
    total = next(e.cpu_time_total for e in events if e.key == "step")
    shares = {s: next((e.cpu_time_total for e in events if e.key == s), 0.0) / total for s in STAGES}
    shares["other (python, masks, cache, noise outside routers, aggregation)"] = 1 - sum(shares.values())
    ops = sorted((e for e in events if not e.key.startswith(("step", *STAGES))),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "K": K, "step_ms_median": statistics.median(times) * 1e3,
        "shares": {k: round(v, 3) for k, v in shares.items()},
        "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                     "calls_per_step": e.count / steps} for e in ops],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ks", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm, tokenizer = load(args.model)
    prompt = _bench_prompt(lm, tokenizer, args.model, args.prompt_tokens)
    results = []
    for K in (int(k) for k in args.ks.split(",")):
        res = profile_k(lm, prompt, K, args.steps, args.top)
        results.append(res)
        print(f"\nK={K}: median step {res['step_ms_median']:.1f} ms")
        for name, share in res["shares"].items():
            print(f"  {share * 100:5.1f}%  {name}")
        print("  top ops (self CPU ms per step, calls per step):")
        for op in res["top_ops"]:
            print(f"    {op['self_ms_per_step']:7.2f} ms  {op['calls_per_step']:6.1f}  {op['op']}")
    print(json.dumps({"profiles": results, "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
