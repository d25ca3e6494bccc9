"""Measurement primitives for `roe bench`: the cost of a roster against K and against naive RoE.

Shapes: K members, P prompt tokens, V vocab.

Every method computes the same RoE step (same members, same keyed noise, same aggregation)
and differs only in how it organises the work:

- ``roster``: ours. One clean cache; the K members folded into one forward (roe/engine.py).
- ``separate``: K forwards per step, one per member, each member with its own KV cache (the
  obvious implementation).
- ``batched-own-cache``: one batched forward of K rows, every member keeping its own KV cache.
- ``recompute``: no KV cache; the whole sequence re-run for the K members at every step (as
  public ports of the paper do).

Each method exposes ``start(prompt_P)`` (prefill; returns the first step's log-probs) and
``step(token)``; the harness times them, tracks peak RSS (Linux ``VmHWM``, reset before each
measurement through ``/proc/self/clear_refs``) and reports the bytes of keys/values held.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from roe.engine import FoldedDecoder
from roe.roster import Roster


def kv_bytes(cache) -> int:
    """Bytes of the keys/values a transformers cache holds (0 for none)."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class RosterMethod:
    """Ours: clean cache, members folded into one forward per step."""

    def __init__(self, roster: Roster) -> None:
        self.roster = roster

    def start(self, prompt_P: torch.Tensor) -> torch.Tensor:
        self.decoder = FoldedDecoder(self.roster, [prompt_P])
        self.pos = len(prompt_P) - 1
        return self.step(prompt_P[-1])

    def step(self, token) -> torch.Tensor:
        logprobs = self.decoder.step(token.reshape(1), torch.tensor([self.pos]))[0]
        self.pos += 1
        return logprobs

    def kv_bytes(self) -> int:
        return self.decoder.cache.kv_bytes()


class SeparateMethod:
    """K forwards per step; member k keeps its own cache of its own (noisy) history."""

    def __init__(self, roster: Roster) -> None:
        self.roster = roster

    def start(self, prompt_P):
        model, K = self.roster.model, self.roster.members
        self.caches, self.bank = [], self.roster.noise_bank()
        for _ in range(K):
            out = model(input_ids=prompt_P[None, :-1], use_cache=True) if len(prompt_P) > 1 else None
            self.caches.append(out.past_key_values if out is not None else None)
        self.pos = len(prompt_P) - 1
        return self.step(prompt_P[-1])

    def step(self, token):
        logits = []
        with self.roster.decode_kernels():
            for k, cache in enumerate(self.caches):
                out = self.roster.forward(member_BQ=torch.tensor([[k]]), position_BQ=torch.tensor([[self.pos]]),
                                          input_ids=token.reshape(1, 1), past_key_values=cache, bank=self.bank)
                self.caches[k] = out.past_key_values
                logits.append(out.logits[0, -1])
        self.pos += 1
        return self.roster.combine(torch.stack(logits), dim=0)

    def kv_bytes(self) -> int:
        return sum(kv_bytes(c) for c in self.caches)


class BatchedOwnCacheMethod:
    """One forward of K batch rows per step; every member keeps its own cache."""

    def __init__(self, roster: Roster) -> None:
        self.roster = roster

    def start(self, prompt_P):
        K = self.roster.members
        self.cache, self.bank = None, self.roster.noise_bank()
        if len(prompt_P) > 1:
            self.cache = self.roster.model(input_ids=prompt_P[None, :-1], use_cache=True).past_key_values
            self.cache.batch_repeat_interleave(K)
        self.pos = len(prompt_P) - 1
        return self.step(prompt_P[-1])

    def step(self, token):
        K = self.roster.members
        with self.roster.decode_kernels():
            out = self.roster.forward(member_BQ=torch.arange(K)[:, None], position_BQ=torch.full((K, 1), self.pos),
                                      input_ids=token.reshape(1, 1).expand(K, 1), past_key_values=self.cache,
                                      bank=self.bank)
        self.cache = out.past_key_values
        self.pos += 1
        return self.roster.combine(out.logits[:, -1], dim=0)

    def kv_bytes(self) -> int:
        return kv_bytes(self.cache)


class RecomputeMethod:
    """No cache: the K members re-run the whole sequence at every step, noisy at every position,
    as naive ports of the paper do (a cost baseline; its histories are not the clean one)."""

    def __init__(self, roster: Roster) -> None:
        self.roster = roster

    def start(self, prompt_P):
        self.tokens = prompt_P.clone()
        return self._run()

    def step(self, token):
        self.tokens = torch.cat([self.tokens, token.reshape(1)])
        return self._run()

    def _run(self):
        K, S = self.roster.members, len(self.tokens)
        out = self.roster.forward(member_BQ=torch.arange(K)[:, None].expand(K, S),
                                  position_BQ=torch.arange(S).expand(K, S),
                                  input_ids=self.tokens.expand(K, S), use_cache=False)
        return self.roster.combine(out.logits[:, -1], dim=0)

    def kv_bytes(self) -> int:
        return 0


METHODS = {"roster": RosterMethod, "separate": SeparateMethod, "batched-own-cache": BatchedOwnCacheMethod,
           "recompute": RecomputeMethod}


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True, kw_only=True)
class BenchRow:
    method: str
    K: int
    decode_step_ms: float
    ttft_ms: float
    tokens_per_s: float
    peak_rss_mb: float
    kv_bytes: int
    steps: int


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: order statistics (x_(j), x_(n+1-j))
    with the largest j whose binomial coverage 1 - 2 P(Bin(n, 1/2) < j) is at least ``level``.
    None when n is too small for any such interval (n <= 5 at 95%)."""
    import math

    xs, n = sorted(values), len(values)
    tail, j = 0.0, 0  # tail = P(Bin(n, 1/2) < j + 1) after the loop step
    while True:
        tail += math.comb(n, j) / 2**n
        if 1 - 2 * tail < level:
            break
        j += 1
    return (xs[j - 1], xs[n - j]) if j >= 1 else None


def combine_rounds(rounds: list[list[BenchRow]]) -> list[dict]:
    """One row per (method, K) from repeated sweeps (same order in every round).

    Times are medians over rounds, peak memory the maximum. ``step_ratio`` (against K=1 of the
    same method) is computed within each round, where both were measured minutes apart on the
    same machine state, and its median is reported with the range over rounds and a 95%
    distribution-free confidence interval (``step_ratio_ci95``, None below 6 rounds).
    """
    import statistics

    out = []
    for i, row in enumerate(rounds[0]):
        same = [rows[i] for rows in rounds]
        firsts = [next(r for r in rows if r.method == row.method) for rows in rounds]
        ratios = [s.decode_step_ms / f.decode_step_ms for s, f in zip(same, firsts, strict=True)]
        step_ms = statistics.median(s.decode_step_ms for s in same)
        peak = max(s.peak_rss_mb for s in same)
        out.append({**row.__dict__, "decode_step_ms": step_ms, "ttft_ms": statistics.median(s.ttft_ms for s in same),
                    "tokens_per_s": 1e3 / step_ms, "peak_rss_mb": peak, "steps": sum(s.steps for s in same),
                    "step_ratio": statistics.median(ratios), "step_ratio_range": [min(ratios), max(ratios)],
                    "step_ratio_ci95": median_ci(ratios),
                    "rss_ratio": peak / max(f.peak_rss_mb for f in firsts)})
    return out


@torch.no_grad()
def measure(method_name: str, roster: Roster, prompt_P: torch.Tensor, new_tokens: int,
            time_box_s: float = 20.0) -> BenchRow:
    """Prefill + up to ``new_tokens`` greedy decode steps, stopping early at the time box."""
    method = METHODS[method_name](roster)
    reset_peak_rss()
    t0 = time.perf_counter()
    logprobs = method.start(prompt_P)
    token = logprobs.argmax()
    ttft = time.perf_counter() - t0
    steps = []
    deadline = time.perf_counter() + time_box_s
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        token = method.step(token).argmax()
        steps.append(time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    step_ms = statistics.median(steps) * 1e3 if steps else float("nan")
    return BenchRow(method=method_name, K=roster.members, decode_step_ms=step_ms, ttft_ms=ttft * 1e3,
                    tokens_per_s=1e3 / step_ms if steps else float("nan"), peak_rss_mb=peak_rss_mb(),
                    kv_bytes=method.kv_bytes(), steps=len(steps))


PROFILE_STAGES = ("attention", "experts", "router", "lm_head")


def _stage_modules(roster: Roster) -> dict[str, list[torch.nn.Module]]:
    """Modules timed as one stage each: attention blocks, expert blocks, routers, the LM head."""
    model = roster.model
    return {
        "attention": [m for m in model.modules() if type(m).__name__.endswith("Attention")],
        "experts": [m for m in model.modules() if type(m).__name__.endswith("Experts")],
        "router": [slot.module for slot in roster.slots],
        "lm_head": [model.get_output_embeddings()],
    }


@torch.no_grad()
def profile_roster(roster: Roster, prompt_P: torch.Tensor, steps: int = 20, top: int = 12) -> dict:
    """torch.profiler over ``steps`` roster decode steps: median step time, share per stage, top ops.

    Stages are record_function scopes around the model's attention, expert and router modules
    and the LM head; "other" is the rest (Python, masks, cache writes, noise outside the routers,
    aggregation).
    """
    import statistics
    from contextlib import ExitStack

    from torch.profiler import ProfilerActivity, profile, record_function

    method = RosterMethod(roster)
    token = method.start(prompt_P).argmax()
    for _ in range(3):
        token = method.step(token).argmax()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        token = method.step(token).argmax()
        times.append(time.perf_counter() - t)
    handles, scopes = [], {}
    for stage, modules in _stage_modules(roster).items():
        for module in modules:
            def pre(m, *_args, _stage=stage):
                scopes[id(m)] = record_function(_stage)
                scopes[id(m)].__enter__()

            def post(m, *_args):
                scopes.pop(id(m)).__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    with ExitStack() as stack:
        stack.callback(lambda: [h.remove() for h in handles])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("step"):
                    token = method.step(token).argmax()
    events = prof.key_averages()
    total = next(e.cpu_time_total for e in events if e.key == "step")
    shares = {s: sum(e.cpu_time_total for e in events if e.key == s) / total for s in PROFILE_STAGES}
    shares["other"] = 1 - sum(shares.values())
    ops = sorted((e for e in events if e.key != "step" and e.key not in PROFILE_STAGES),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"K": roster.members, "step_ms_median": statistics.median(times) * 1e3,
            "shares": {k: round(v, 4) for k, v in shares.items()},
            "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                         "calls_per_step": e.count / steps} for e in ops]}
