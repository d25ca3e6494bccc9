"""RoE settings of an engine and of each request: parsed, validated, resolved to one tau per MoE layer.

Keys (flat, same names and meaning as ``roe.RoEConfig`` and ``roe serve``):

    roster_size  K >= 1, members averaged at each token (member 0 is clean)
    tau          a float (uniform over the noisy MoE layers) or a list (one value per MoE layer);
                 absent: the model's default schedule (its checkpoint's schedule.json, else 0.1), as in roe
    seed         int >= 0, keys the routing noise (roe/routing.py)
    skip_first   MoE layers kept clean at the start when tau is a float
    skip_last    MoE layers kept clean at the end when tau is a float
    schedule     the name of a schedule registered in the engine's ``schedules`` (never a path)
    experts_per_token  k, the experts every row of the request selects in every MoE layer (its clean
                 prefill, member 0 and every member), gate weights as the model computes them with k;
                 absent or None: the model's own (the MoE-PHDS dial, arXiv 2509.23012; roe_vllm/routing.py)

The engine's ``additional_config={"roe": {...}}`` holds defaults for the same keys plus
``schedules``: ``{name: schedule JSON dict (format roe.schedule/1) or list of taus}`` and ``kernels``
(default true: member attention and the members' mean probability through the compiled kernels,
roe_vllm/attention.py and roe_vllm/aggregation.py). A request's
``SamplingParams.extra_args`` overrides the defaults key by key. Without engine defaults (no "roe"
entry, or one with only ``schedules``), a request without RoE keys runs the untouched model; K = 1
or an all-zero schedule also does, unless it dials ``experts_per_token`` to another k than the model's.

This module knows nothing about vLLM; it validates with roe's own ``RoEConfig`` and ``Schedule``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from roe.config import RoEConfig
from roe.schedule import SCHEDULE_FORMAT, Schedule, model_default_schedule

REQUEST_KEYS = ("roster_size", "tau", "seed", "skip_first", "skip_last", "schedule", "experts_per_token")
ENGINE_KEYS = REQUEST_KEYS + ("schedules", "kernels")
# Request features whose meaning RoE does not define in vLLM (they would silently be clean).
UNSUPPORTED_REQUEST = {"prompt_logprobs": "prompt_logprobs (per-position RoE scoring is roe's score(), not served)"}


@dataclass(frozen=True)
class Roster:
    """What one request's members run: K members, tau per MoE layer, the noise seed, k (None: the model's)."""

    members: int
    tau_L: tuple[float, ...]
    seed: int
    experts_per_token: int | None = None

    @property
    def first_noisy(self) -> int:
        return next(i for i, t in enumerate(self.tau_L) if t > 0)


def _schedule(name: str, spec: Any) -> Schedule:
    """A registered schedule: a roe schedule JSON dict or a plain list of taus."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, (list, tuple)):
        return Schedule(tau=tuple(spec), provenance={"kind": "list", "name": name})
    if isinstance(spec, Mapping):
        if spec.get("format") != SCHEDULE_FORMAT or "tau" not in spec:
            raise ValueError(f"RoE schedule {name!r}: expected a list of taus or a dict with format "
                             f"{SCHEDULE_FORMAT!r} and 'tau'")
        return Schedule(tau=tuple(spec["tau"]), provenance=dict(spec.get("provenance", {})))
    raise TypeError(f"RoE schedule {name!r}: expected a list of taus or a schedule JSON dict, "
                    f"got {type(spec).__name__}")


@dataclass(frozen=True)
class EngineSettings:
    """The engine's RoE defaults and registered schedules (``additional_config["roe"]``)."""

    defaults: dict
    schedules: dict[str, Schedule]
    enabled: bool  # the engine sets RoE defaults: requests without RoE keys run RoE with them
    model_default: Schedule | None = None  # the schedule.json shipped with the checkpoint (tau absent)
    kernels: bool = True  # member attention and the member mean through the compiled kernels where they build

    @classmethod
    def parse(cls, additional_config: Mapping | None, model_dir: str | None = None) -> EngineSettings:
        """``model_dir``: the checkpoint, whose shipped schedule is the tau of requests that give none."""
        model_default = model_default_schedule(model_dir) if model_dir else None
        entry = (additional_config or {}).get("roe")
        if entry is None:
            return cls(defaults={}, schedules={}, enabled=False, model_default=model_default)
        if not isinstance(entry, Mapping):
            raise TypeError(f'additional_config["roe"] must be a dict, got {type(entry).__name__}')
        unknown = sorted(set(entry) - set(ENGINE_KEYS))
        if unknown:
            raise ValueError(f'additional_config["roe"]: unknown keys {unknown}; known: {list(ENGINE_KEYS)}')
        schedules = entry.get("schedules") or {}
        if not isinstance(schedules, Mapping):
            raise TypeError('additional_config["roe"]["schedules"] must be a dict {name: schedule}')
        parsed = {str(name): _schedule(str(name), spec) for name, spec in schedules.items()}
        kernels = entry.get("kernels", True)
        if not isinstance(kernels, bool):
            raise TypeError(f'additional_config["roe"]["kernels"] must be true or false, got {kernels!r}')
        defaults = {k: v for k, v in entry.items() if k not in ("schedules", "kernels")}
        settings = cls(defaults=defaults, schedules=parsed, enabled=bool(defaults), model_default=model_default,
                       kernels=kernels)
        settings._config(defaults)  # the defaults alone must be valid
        return settings

    def _config(self, values: Mapping) -> RoEConfig:
        values = dict(values)
        name = values.pop("schedule", None)
        if name is not None:
            if not isinstance(name, str):
                raise TypeError(f"RoE schedule must be a registered name (str), got {type(name).__name__}")
            if name not in self.schedules:
                raise ValueError(f"unknown RoE schedule {name!r}; registered: {sorted(self.schedules) or 'none'}")
            values["tau"] = self.schedules[name]
        if isinstance(values.get("tau"), str):
            raise TypeError("RoE tau must be a number or a list; name a registered schedule with 'schedule'")
        return RoEConfig(**values)

    def config(self, extra_args: Mapping | None) -> RoEConfig | None:
        """The request's RoEConfig, or None when it runs the untouched model. Raises on invalid settings."""
        given = {k: v for k, v in (extra_args or {}).items() if k in REQUEST_KEYS}
        if not given and not self.enabled:
            return None
        values = dict(self.defaults)
        if "tau" in given and "schedule" in values:
            values.pop("schedule")  # a request's own tau overrides the engine's default schedule
        if "schedule" in given and "tau" in given:
            raise ValueError("give either RoE 'tau' or 'schedule', not both")
        values.update(given)
        return self._config(values)

    def roster(self, extra_args: Mapping | None, num_moe_layers: int) -> Roster | None:
        """The request's members and per-layer tau for a model with this many MoE layers; None: untouched."""
        cfg = self.config(extra_args)
        if cfg is None:
            return None
        schedule = cfg.schedule(num_moe_layers, self.model_default)
        if cfg.roster_size == 1 or schedule.is_clean:
            return None
        return Roster(members=cfg.roster_size, tau_L=schedule.tau, seed=cfg.seed,
                      experts_per_token=cfg.experts_per_token)

    def experts_per_token(self, extra_args: Mapping | None) -> int | None:
        """The k every row of the request selects; None: the model's own (also for a request without RoE).

        Independent of the roster: a K = 1 request that dials k runs the model with k (pure MoE-PHDS serving).
        """
        cfg = self.config(extra_args)
        return None if cfg is None else cfg.experts_per_token


def check_request(engine: EngineSettings, params, num_moe_layers: int | None,
                  experts: tuple[int, int] | None = None) -> None:
    """Refuse a request whose RoE settings are invalid: a ValueError with the reason (vLLM turns it into
    a validation error, HTTP 400 in the server). ``experts``: the model's (experts per MoE layer, own k)."""
    try:
        cfg = engine.config(params.extra_args)
        if cfg is None:
            return
        if num_moe_layers is not None:
            cfg.schedule(num_moe_layers, engine.model_default)
    except TypeError as err:
        raise ValueError(str(err)) from None
    k = cfg.experts_per_token
    if k is not None and experts is not None and k > experts[0]:
        raise ValueError(f"experts_per_token={k} exceeds the model's {experts[0]} experts per MoE layer "
                         f"(its own k is {experts[1]}); choose 1 <= experts_per_token <= {experts[0]}")
    for name, what in UNSUPPORTED_REQUEST.items():
        if getattr(params, name, None) is not None:
            raise ValueError(f"RoE requests do not support {what}")
