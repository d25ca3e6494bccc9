"""A quick decode-step cost check of RoE on vLLM: K = 1, 2, 4, 8, 16 against plain vLLM at batch 1 and 8.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python vllm_plugin/step_time.py [--rounds 5] [--steps 64]

One in-process engine on roe's embedded default model (fp32, eager); plain = requests without RoE
settings on the same engine (the stock forward). A step's cost is the engine thread's CPU time of
a generation of ``steps`` + 1 tokens minus one of 1 token, over ``steps``; each round measures plain
and every K back to back, and the ratio to plain is taken per round (median over rounds), so a
busy machine slows both sides of a ratio alike. Prompt: 7 tokens; tau 0.1 with skip_first = skip_last
= 1. This is a sanity check, not the benchmark (benchmarks/ has that).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = [1216, 14, 199, 41, 396, 356, 12]
MEMBERS = (1, 2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()

    import roe_vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**roe_vllm.engine_args(None, dtype="float32", max_model_len=512, enable_prefix_caching=False))

    def cpu_seconds(batch: int, extra: dict | None, tokens: int) -> float:
        params = [SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, extra_args=extra)] * batch
        start = time.thread_time()
        llm.generate([TokensPrompt(prompt_token_ids=PROMPT)] * batch, params, use_tqdm=False)
        return time.thread_time() - start

    def step_ms(batch: int, extra: dict | None) -> float:
        return (cpu_seconds(batch, extra, args.steps + 1) - cpu_seconds(batch, extra, 1)) / args.steps * 1e3

    result = {}
    for batch in (1, 8):
        cases = {"plain": None} | {f"K={k}": {"roster_size": k, "tau": 0.1} for k in MEMBERS}
        for extra in cases.values():
            step_ms(batch, extra)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, extra in cases.items():
                times[name].append(step_ms(batch, extra))
        row = {"plain_ms": statistics.median(times["plain"])}
        for name in cases:
            if name != "plain":
                ratios = [t / p for t, p in zip(times[name], times["plain"])]
                row[name] = {"ms": statistics.median(times[name]), "ratio": statistics.median(ratios),
                             "ratio_range": [min(ratios), max(ratios)]}
        result[f"B={batch}"] = row
        print(f"B={batch}", json.dumps(row), flush=True)
    print(json.dumps({"step_time": result, "rounds": args.rounds, "steps": args.steps,
                      "threads": os.environ["OMP_NUM_THREADS"]}))


if __name__ == "__main__":
    main()
