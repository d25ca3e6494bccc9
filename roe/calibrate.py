"""Per-layer temperature search (paper §2.2, App. B): TPE over tau_L on validation NLL.

Search space: tau_l in [0, tau_max] for every noisy MoE layer l; the first ``skip_first`` and
last ``skip_last`` MoE layers stay at 0. Objective: mean next-token NLL of the roster over a
fixed set of validation windows. The effect of RoE on NLL is small (1e-3 nats), so every trial
scores the *same* windows with the *same* roster seed: trials differ only by their schedule, and
comparing objective values is a paired comparison (common random numbers).

The uniform baseline scores one tau on all searched layers over a grid. When it runs, its best
point is enqueued as TPE's first trial, so the TPE result is never worse than the best uniform
tau on those layers on the validation objective. The paper's App. B sweep puts one tau on every
MoE layer: a search with ``skip_first = skip_last = 0``.

This module knows nothing about files or the command line; ``roe calibrate`` (roe/cli.py) does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from roe.analysis import num_moe_layers  # noqa: F401  (the CLI's name for the one MoE layer count)
from roe.config import RoEConfig
from roe.eval.perplexity import clean_score_fn, paired, roster_nll, window_nll


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Which MoE layers are searched, and over what range."""

    num_layers: int
    tau_max: float
    skip_first: int = 1
    skip_last: int = 1

    def __post_init__(self) -> None:
        if not self.tau_max > 0 or math.isinf(self.tau_max):
            raise ValueError(f"--tau-max must be finite and > 0, got {self.tau_max}")
        if self.skip_first < 0 or self.skip_last < 0:
            raise ValueError("--skip-first and --skip-last must be >= 0")
        if not self.noisy:
            raise ValueError(f"skip_first ({self.skip_first}) + skip_last ({self.skip_last}) leaves none of the "
                             f"{self.num_layers} MoE layers to search")

    @property
    def noisy(self) -> range:
        return range(self.skip_first, self.num_layers - self.skip_last)

    def schedule(self, noisy_tau: dict[int, float]) -> list[float]:
        """The full per-MoE-layer tau list, 0 outside the searched layers."""
        return [float(noisy_tau.get(i, 0.0)) for i in range(self.num_layers)]

    def uniform(self, tau: float) -> list[float]:
        return self.schedule({i: tau for i in self.noisy})


@dataclass(kw_only=True)
class Calibration:
    """Everything a search measured; NLLs are mean nats per predicted token."""

    tau: list[float]
    best_value: float
    base_value: float
    trial_values: list[float]
    best_delta_se: float
    uniform: list[tuple[float, float]] = field(default_factory=list)

    @property
    def best_uniform(self) -> tuple[float, float] | None:
        return min(self.uniform, key=lambda tv: tv[1]) if self.uniform else None


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("roe calibrate needs optuna: pip install 'roe[calibrate]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def schedule_nll(model, tau: list[float], windows_NW: torch.Tensor, *, K: int, seed: int,
                 batch_size: int = 4) -> torch.Tensor:
    """Per-window NLL [N] of a roster of K members with this exact per-layer schedule."""
    cfg = RoEConfig(roster_size=K, tau=list(tau), seed=seed, skip_first=0, skip_last=0)
    return roster_nll(model, cfg, windows_NW, batch_size)


def search_schedule(model, windows_NW: torch.Tensor, space: SearchSpace, *, K: int, trials: int, seed: int = 0,
              grid: list[float] | None = None, batch_size: int = 4, progress: bool = True) -> Calibration:
    """Uniform grid (if ``grid``) then ``trials`` TPE trials; returns the best schedule found."""
    from tqdm import tqdm

    optuna = _optuna()
    if K < 1:
        raise ValueError(f"--roster-size must be >= 1, got {K}")
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    if grid and (min(grid) < 0 or max(grid) > space.tau_max):
        raise ValueError(f"--grid values must lie in [0, --tau-max={space.tau_max}], got {grid}")
    base_N = window_nll(clean_score_fn(model), windows_NW, batch_size)
    nll_of = {}  # schedule tuple -> per-window NLL, so repeated points cost nothing

    def measure(tau: list[float]) -> float:
        key = tuple(tau)
        if key not in nll_of:
            nll_of[key] = base_N if not any(key) else schedule_nll(model, tau, windows_NW, K=K, seed=seed,
                                                                   batch_size=batch_size)
        return float(nll_of[key].mean())

    bar = tqdm(total=len(grid or []) + trials, desc="calibrate", unit="trial", disable=not progress)
    uniform = []
    for tau in grid or []:
        uniform.append((tau, measure(space.uniform(tau))))
        bar.update(1)
    # TPE samples at random for its first n_startup_trials (optuna's default 10); short searches
    # start modelling sooner.
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3)))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    if uniform:
        best_tau = min(uniform, key=lambda tv: tv[1])[0]
        study.enqueue_trial({f"tau_{i}": best_tau for i in space.noisy})

    def objective(trial) -> float:
        picked = {i: trial.suggest_float(f"tau_{i}", 0.0, space.tau_max) for i in space.noisy}
        value = measure(space.schedule(picked))
        bar.update(1)
        bar.set_postfix(nll=f"{value:.5f}")
        return value

    study.optimize(objective, n_trials=trials)
    bar.close()
    tau = space.schedule({i: study.best_params[f"tau_{i}"] for i in space.noisy})
    _, se = paired(nll_of[tuple(tau)], base_N)
    return Calibration(tau=tau, best_value=study.best_value, base_value=float(base_N.mean()),
                       trial_values=[t.value for t in study.trials], best_delta_se=se, uniform=uniform)
