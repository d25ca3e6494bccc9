"""RoEConfig: the roster's settings, validated on construction.

Only what can be checked without a model is checked here (K, tau values, skips, aggregator,
seed). What needs the model (the number of MoE layers) is checked when ``roe.roster`` resolves
the schedule, before any compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from roe.aggregate import AGGREGATORS
from roe.schedule import DEFAULT_TAU, Schedule, check_tau_value

TauSpec = float | int | list | tuple | str | Path | Schedule | None


@dataclass(frozen=True, kw_only=True)
class RoEConfig:
    """Roster of Experts settings.

    roster_size: K, the number of members averaged at each token (member 0 is clean).
    tau: None (the default: the model's default schedule, i.e. the ``schedule.json`` shipped in
        its checkpoint directory, else uniform ``DEFAULT_TAU`` = 0.1; see roe/schedule.py), a
        float (uniform over the noisy MoE layers), a list/tuple (one value per MoE layer, used as
        given), a ``Schedule``, or the path of a schedule JSON file.
    skip_first / skip_last: MoE layers kept clean at each end when the schedule is uniform.
    seed: keys the noise (see roe/routing.py); same seed, same output.
    aggregator: how member distributions combine (see roe/aggregate.py).
    noisy_weights: gate weights from the noisy scores instead of the clean ones (off by default).
    experts_per_token: k, the experts every member (the clean one and the prefill too) selects in
        every MoE layer; None (the default) keeps the model's own. The runtime sparsity dial of
        MoE-PHDS (arXiv 2509.23012): gate weights are the model's own computed over the k chosen,
        as in the model built with ``num_experts_per_tok = k``. Checked against the model's
        experts when the roster is built (roe/adapters).
    kernels: decode steps with K > 1 may use the CPU kernels of roe/kernels.py (the packed LM head,
        the small-M linear), which equal ``F.linear`` up to float rounding; False keeps every
        product the model's own. K = 1 never uses them: it is the untouched model either way.
    """

    roster_size: int = 8
    tau: TauSpec = None
    skip_first: int = 1
    skip_last: int = 1
    seed: int = 0
    aggregator: str = "mean-prob"
    noisy_weights: bool = False
    experts_per_token: int | None = None
    kernels: bool = True

    def __post_init__(self) -> None:
        _check_int("roster_size", self.roster_size, minimum=1)
        _check_int("skip_first", self.skip_first, minimum=0)
        _check_int("skip_last", self.skip_last, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.seed >= 1 << 63:
            raise ValueError(f"seed must be below 2**63, got {self.seed}")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; choose from {sorted(AGGREGATORS)}")
        if not isinstance(self.noisy_weights, bool):
            raise TypeError(f"noisy_weights must be a bool, got {self.noisy_weights!r}")
        if not isinstance(self.kernels, bool):
            raise TypeError(f"kernels must be a bool, got {self.kernels!r}")
        if self.experts_per_token is not None:
            _check_int("experts_per_token", self.experts_per_token, minimum=1)
        tau = self.tau
        if isinstance(tau, (list, tuple)):
            object.__setattr__(self, "tau", Schedule(tau=tuple(tau), provenance={"kind": "list"}))
        elif isinstance(tau, (str, Path)):
            object.__setattr__(self, "tau", Schedule.load(tau))
        elif tau is not None and not isinstance(tau, Schedule):
            object.__setattr__(self, "tau", check_tau_value(tau, "RoEConfig"))

    def schedule(self, num_moe_layers: int, model_default: Schedule | None = None) -> Schedule:
        """The per-layer tau for a model with this many MoE layers (validated).

        ``model_default`` is the model's shipped schedule (``roe.schedule.model_default_schedule``);
        with ``tau`` None it is used, and without one the schedule is uniform ``DEFAULT_TAU``.
        ``roe.roster.schedule_for(model, cfg)`` passes it: call that when you hold the model.
        """
        if self.skip_first + self.skip_last > num_moe_layers:
            raise ValueError(
                f"skip_first ({self.skip_first}) + skip_last ({self.skip_last}) exceeds the model's "
                f"{num_moe_layers} MoE layers"
            )
        tau = model_default if self.tau is None else self.tau
        if isinstance(tau, Schedule):
            tau.check_layers(num_moe_layers)
            return tau
        tau = DEFAULT_TAU if tau is None else tau
        return Schedule.uniform(tau, num_moe_layers, skip_first=self.skip_first, skip_last=self.skip_last)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
