"""Where a roster decode step spends its time: torch.profiler over greedy steps, by stage.

Loads a model (default: the embedded one), prefills a --prompt-tokens prompt from the test split,
then profiles --steps decode steps of the ``roster`` method at each K (``roe.bench.profile_roster``).
Prints, per K, the median step time, the share of each stage (attention, experts, router + RoE
noise, LM head, other: Python, masks, cache writes, aggregation) and the top operators by self
CPU time. The last line is one JSON document.

    python benchmarks/profile_step.py --ks 1,8,32 --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import json

import torch

import roe
from roe.bench import profile_roster
from roe.cli import _bench_prompt
from roe.loading import default_schedule_path, load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--schedule", default=None, help="default: the embedded model's shipped schedule")
    ap.add_argument("--tau", type=float, default=0.1, help="uniform tau when --model is given without --schedule")
    ap.add_argument("--ks", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm, tokenizer = load(args.model)
    prompt = _bench_prompt(lm, tokenizer, args.model, args.prompt_tokens)
    tau = args.schedule or (str(default_schedule_path()) if args.model is None else args.tau)
    results = []
    for K in (int(k) for k in args.ks.split(",")):
        with roe.roster(lm, roe.RoEConfig(roster_size=K, tau=tau)) as r:
            res = profile_roster(r, prompt, args.steps, args.top)
        results.append(res)
        print(f"\nK={K}: median step {res['step_ms_median']:.1f} ms")
        for name, share in res["shares"].items():
            print(f"  {share * 100:5.1f}%  {name}")
        print("  top ops (self CPU ms per step, calls per step):")
        for op in res["top_ops"]:
            print(f"    {op['self_ms_per_step']:7.2f} ms  {op['calls_per_step']:6.1f}  {op['op']}")
    print(json.dumps({"profiles": results, "threads": args.threads, "prompt_tokens": len(prompt),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
