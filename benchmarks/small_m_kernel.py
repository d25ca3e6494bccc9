"""Experiment: a small-M AVX2 product for the attention projections of K-row decode steps.

    python benchmarks/small_m_kernel.py --ks 8,1 --steps 300

A roster decode step at K=8 runs every per-layer product on 8 rows. MKL takes 2-3x as long for
8 rows as for 1 at this model's sizes (256 x 256: about 30 against 12 us), though the weight is
read once either way. The kernel below reads one weight row into registers and multiplies it
with all M <= 8 input rows (8 independent FMA chains), so 8 rows cost little more than 1.

Not part of the engine yet: it is compiled at run time with ``torch.utils.cpp_extension``
(needs g++ and ninja; about 40 s the first time, then cached), has no fallback story, and rounds
differently from MKL, so K=1 could not use it and stay bit-exact. This script measures what it
would buy. It prints per-product times (F.linear against the kernel, 1 and 8 rows), then a paired
step A/B on the default model: one roster, two decoders stepping alternately, one with q/k/v/o
projections through the kernel. The last line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import roe
from roe.engine import FoldedDecoder
from roe.loading import default_schedule_path, load

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi); lo = _mm_hadd_ps(lo, lo); lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// y[M, N] = x[M, K] @ w[N, K]^T; C accumulators per row so that M * C >= 8 FMA chains.
template <int M, int C>
static void rows(const float* X, const float* W, float* Y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = W + n * K;
    __m256 acc[M][C];
    for (int m = 0; m < M; ++m) for (int c = 0; c < C; ++c) acc[m][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8 * C)
      for (int c = 0; c < C; ++c) {
        __m256 w = _mm256_loadu_ps(wr + k + 8 * c);
        for (int m = 0; m < M; ++m)
          acc[m][c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(X + m * K + k + 8 * c), acc[m][c]);
      }
    for (int m = 0; m < M; ++m) {
      __m256 s = acc[m][0];
      for (int c = 1; c < C; ++c) s = _mm256_add_ps(s, acc[m][c]);
      Y[m * N + n] = hsum(s);
    }
  }
}

torch::Tensor small_m_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat && w.dtype() == torch::kFloat && x.is_contiguous() && w.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 32 == 0 && w.size(1) == K && (M == 1 || M == 2 || M == 4 || M == 8));
  auto y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>(); const float* W = w.data_ptr<float>(); float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows<1, 4>(X, W, Y, K, N, n0, n1); break;
      case 2: rows<2, 4>(X, W, Y, K, N, n0, n1); break;
      case 4: rows<4, 2>(X, W, Y, K, N, n0, n1); break;
      default: rows<8, 1>(X, W, Y, K, N, n0, n1);
    }
  });
  return y;
}
"""


def build():
    from torch.utils.cpp_extension import load_inline

    return load_inline("roe_small_m", cpp_sources=SOURCE, functions=["small_m_linear"],
                       extra_cflags=["-O3", "-mavx2", "-mfma"])


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


def step_ab(model, kernel, members: int, steps: int) -> dict:
    """Paired decode-step A/B: q/k/v/o projections through ``kernel`` or F.linear."""
    projections = [m for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m.bias is None
                   and name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]

    def fast_forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] not in (1, 2, 4, 8) or x.shape[-1] % 32:
            return F.linear(x, self.weight)
        return kernel(rows.contiguous(), self.weight).view(*x.shape[:-1], -1)

    def use_kernel(on: bool) -> None:
        for module in projections:
            if on:
                module.forward = fast_forward.__get__(module)
            else:
                module.__dict__.pop("forward", None)

    prompt = torch.randint(0, model.config.vocab_size, (128,), generator=torch.Generator().manual_seed(0))
    cfg = roe.RoEConfig(roster_size=members, tau=str(default_schedule_path()))
    times = {"base": [], "kernel": []}
    with torch.no_grad(), roe.roster(model, cfg) as r:
        decoders = {arm: FoldedDecoder(r, [prompt]) for arm in times}
        pos = dict.fromkeys(times, len(prompt) - 1)
        try:
            for i in range(steps + 10):
                for arm in (("base", "kernel") if i % 2 else ("kernel", "base")):
                    use_kernel(arm == "kernel")
                    t = time.perf_counter()
                    with r.decode_kernels():
                        decoders[arm].step(prompt[pos[arm] % len(prompt)].reshape(1), torch.tensor([pos[arm]]))
                    if i >= 10:
                        times[arm].append((time.perf_counter() - t) * 1e3)
                    pos[arm] += 1
                    if pos[arm] > 200:  # bounded history: start over
                        decoders[arm], pos[arm] = FoldedDecoder(r, [prompt]), len(prompt) - 1
        finally:
            use_kernel(False)
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
    kernel = build().small_m_linear
    calls = products(kernel)
    for c in calls:
        print(f"{c['shape'][0]}x{c['shape'][1]}, {c['rows']} rows: F.linear {c['f_linear_us']:.1f} us, "
              f"kernel {c['kernel_us']:.1f} us")
    model, _ = load()
    steps = [step_ab(model, kernel, int(k), args.steps) for k in args.ks.split(",")]
    for s in steps:
        print(f"K={s['K']}: step {s['base_ms']:.2f} -> {s['kernel_ms']:.2f} ms, paired median "
              f"{s['paired_diff_ms']:+.3f} ms")
    print(json.dumps({"products": calls, "steps": steps, "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
