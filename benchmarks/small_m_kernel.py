"""What the small-M kernel of decode steps buys (``roe.kernels.SmallM``), per product and per step.

    python benchmarks/small_m_kernel.py --ks 8,1,8,1 --steps 300

A roster decode step at K=8 runs every per-layer product on 8 rows. MKL takes 2-3x as long for
8 rows as for 1 at this model's sizes, though the weight is read once either way; the kernel
reads one weight row into registers and multiplies it with every row. The engine uses it for
K > 1 only: it rounds differently from MKL, so K=1 (the untouched model, bit for bit) cannot.

Prints per-product times (F.linear against the kernel, 1 and 8 rows), then a paired step A/B on
the default model: one roster, two decoders stepping alternately, one with the decoder linears
through the kernel and one without. At K=1 the kernel is forced on, which measures what it would
save the baseline (the "same-kernel" ratio of docs/performance.md). The last line is one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

import roe
from roe.engine import FoldedDecoder
from roe.kernels import SmallM
from roe.loading import default_schedule_path, load


def per_call_us(fn, calls: int = 1000) -> float:
    for _ in range(50):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def products(kernel, rounds: int = 7) -> list[dict]:
    """Median per-call time of F.linear and the kernel, alternating, for the model's shapes."""
    out = []
    for n, k in ((256, 256), (192, 256), (32, 256)):
        weight = torch.randn(n, k)
        for m in (1, 8):
            x = torch.randn(m, k)
            torch.testing.assert_close(kernel(x, weight), F.linear(x, weight), rtol=1e-4, atol=1e-4)
            base, fast = [], []
            for _ in range(rounds):
                base.append(per_call_us(lambda x=x, w=weight: F.linear(x, w)))
                fast.append(per_call_us(lambda x=x, w=weight: kernel(x, w)))
            out.append({"shape": [n, k], "rows": m, "f_linear_us": statistics.median(base),
                        "kernel_us": statistics.median(fast)})
    return out


def step_ab(model, members: int, steps: int) -> dict:
    """Paired decode-step A/B: the decoder linears through the kernel, or through F.linear."""
    kernel = SmallM.for_model(model)
    prompt = torch.randint(0, model.config.vocab_size, (128,), generator=torch.Generator().manual_seed(0))
    # the engine's own kernels off (packed head too, in both arms): each arm decides about the small-M kernel
    cfg = roe.RoEConfig(roster_size=members, tau=str(default_schedule_path()), kernels=False)
    times = {"base": [], "kernel": []}
    with torch.no_grad(), roe.roster(model, cfg) as r:
        decoders = {arm: FoldedDecoder(r, [prompt]) for arm in times}
        pos = dict.fromkeys(times, len(prompt) - 1)
        for i in range(steps + 10):
            for arm in (("base", "kernel") if i % 2 else ("kernel", "base")):
                t = time.perf_counter()
                with kernel.installed() if arm == "kernel" else contextlib.nullcontext(), r.decode_kernels():
                    decoders[arm].step(prompt[pos[arm] % len(prompt)].reshape(1), torch.tensor([pos[arm]]))
                if i >= 10:
                    times[arm].append((time.perf_counter() - t) * 1e3)
                pos[arm] += 1
                if pos[arm] > 200:  # bounded history: start over
                    decoders[arm], pos[arm] = FoldedDecoder(r, [prompt]), len(prompt) - 1
    diffs = [b - a for a, b in zip(times["base"], times["kernel"])]
    return {"K": members, "steps": steps, "base_ms": statistics.median(times["base"]),
            "kernel_ms": statistics.median(times["kernel"]), "paired_diff_ms": statistics.median(diffs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="8,1")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    extension = SmallM.extension()
    if extension is None:
        raise SystemExit("the small-M kernel is not available here (no AVX2, or it did not build: see above)")
    calls = products(extension.small_m_linear)
    for c in calls:
        print(f"{c['shape'][0]}x{c['shape'][1]}, {c['rows']} rows: F.linear {c['f_linear_us']:.1f} us, "
              f"kernel {c['kernel_us']:.1f} us")
    model, _ = load()
    steps = [step_ab(model, int(k), args.steps) for k in args.ks.split(",")]
    for s in steps:
        print(f"K={s['K']}: step {s['base_ms']:.2f} -> {s['kernel_ms']:.2f} ms, paired median "
              f"{s['paired_diff_ms']:+.3f} ms")
    print(json.dumps({"products": calls, "steps": steps, "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
