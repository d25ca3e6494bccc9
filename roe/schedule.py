"""Per-layer temperature schedules: one tau per MoE layer, JSON-serialisable with provenance.

A schedule is the vector tau_L of the noisy forward: entry l is the Gumbel temperature of the l-th
*MoE* layer (dense layers have no entry). ``Schedule.uniform`` builds the paper's shape: the
first ``skip_first`` and last ``skip_last`` MoE layers at 0, one value in between. Calibrated
schedules (``roe calibrate``) are stored as JSON with where they came from.

A model's *default schedule* (what ``RoEConfig(tau=None)`` means) is the roe schedule JSON
shipped in its checkpoint directory as ``schedule.json`` (the embedded model ships its
calibrated one), else uniform ``DEFAULT_TAU`` between the clean first and last MoE layers.
``model_default_schedule`` finds that file from a directory or hub id alone, with no model and
no transformers, so the vLLM plugin resolves the same default from its own environment.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEDULE_FORMAT = "roe.schedule/1"
SCHEDULE_FILE = "schedule.json"  # a checkpoint's default schedule, next to its config.json
DEFAULT_TAU = 0.1  # the uniform temperature of a model that ships no schedule


def check_tau_value(tau: Any, where: str) -> float:
    """A temperature must be a finite real number >= 0; bools and strings are refused."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"{where}: tau must be a number, got {type(tau).__name__} {tau!r}")
    tau = float(tau)
    if math.isnan(tau) or math.isinf(tau) or tau < 0:
        raise ValueError(f"{where}: tau must be finite and >= 0, got {tau}")
    return tau


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """tau for each MoE layer, in layer order, plus free-form provenance."""

    tau: tuple[float, ...]
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tau, (tuple, list)) or len(self.tau) == 0:
            raise ValueError(f"a schedule needs one tau per MoE layer, got {self.tau!r}")
        values = tuple(check_tau_value(t, f"schedule layer {i}") for i, t in enumerate(self.tau))
        object.__setattr__(self, "tau", values)
        if not isinstance(self.provenance, dict):
            raise TypeError("schedule provenance must be a dict")

    @property
    def num_layers(self) -> int:
        return len(self.tau)

    @property
    def is_clean(self) -> bool:
        """True when no layer is noisy: every member then equals the clean member."""
        return all(t == 0.0 for t in self.tau)

    @classmethod
    def uniform(cls, tau: float, num_layers: int, *, skip_first: int = 1, skip_last: int = 1,
                provenance: dict[str, Any] | None = None) -> Schedule:
        """One tau on the middle layers; the first skip_first and last skip_last MoE layers at 0."""
        tau = check_tau_value(tau, "uniform schedule")
        if skip_first + skip_last > num_layers:
            raise ValueError(
                f"skip_first ({skip_first}) + skip_last ({skip_last}) exceeds the {num_layers} MoE layers"
            )
        values = [tau if skip_first <= i < num_layers - skip_last else 0.0 for i in range(num_layers)]
        return cls(tau=tuple(values), provenance=provenance or {"kind": "uniform", "tau": tau})

    def check_layers(self, num_layers: int) -> None:
        if self.num_layers != num_layers:
            raise ValueError(
                f"the schedule has {self.num_layers} entries but the model has {num_layers} MoE layers"
                + (f" (schedule made for {self.provenance['model']})" if "model" in self.provenance else "")
            )

    def check_model(self, fingerprint: dict[str, Any]) -> None:
        """Refuse a schedule calibrated for a model of another architecture (``model_fingerprint``)."""
        made_for = self.provenance.get("fingerprint")
        if not isinstance(made_for, dict):
            return
        differ = {k: (made_for[k], fingerprint.get(k)) for k in made_for if made_for[k] != fingerprint.get(k)}
        if differ:
            detail = ", ".join(f"{k} {a!r} in the schedule vs {b!r} in the model" for k, (a, b) in differ.items())
            raise ValueError(f"the schedule was made for another model ({self.provenance.get('model', 'unknown')}): "
                             f"{detail}")

    def to_json(self) -> dict[str, Any]:
        return {"format": SCHEDULE_FORMAT, "tau": list(self.tau), "provenance": self.provenance}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"schedule file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or data.get("format") != SCHEDULE_FORMAT or "tau" not in data:
            raise ValueError(f"{path} is not a roe schedule (expected format {SCHEDULE_FORMAT!r} and a 'tau' list)")
        return cls(tau=tuple(data["tau"]), provenance=data.get("provenance", {}))


def model_default_schedule(model_dir: str | Path | None) -> Schedule | None:
    """The roe schedule shipped with a checkpoint (``schedule.json`` in its directory), or None.

    ``model_dir`` is a local checkpoint directory or a hub id (looked up in the local hub cache
    only: nothing is downloaded). A ``schedule.json`` of another format (some other tool's file)
    is not ours and is ignored; one in roe's format that is invalid raises ValueError.
    """
    if not model_dir:
        return None
    path = Path(model_dir) / SCHEDULE_FILE
    if not Path(model_dir).is_dir():
        path = _hub_cached(str(model_dir), SCHEDULE_FILE)
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != SCHEDULE_FORMAT:
        return None
    return Schedule.load(path)


def _hub_cached(repo_id: str, filename: str) -> Path | None:
    """A file of a hub repository if the local hub cache holds it (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # not a valid repo id, or no huggingface_hub: nothing cached to find
        return None
    return Path(found) if isinstance(found, str) else None


def model_fingerprint(model) -> dict[str, Any]:
    """What a schedule must match: the architecture facts of the model's text config."""
    config = model.config.get_text_config()
    experts = next((getattr(config, name) for name in ("num_experts", "num_local_experts", "n_routed_experts",
                                                        "moe_num_experts") if getattr(config, name, None)), None)
    return {"model_type": config.model_type, "num_hidden_layers": getattr(config, "num_hidden_layers", None),
            "hidden_size": getattr(config, "hidden_size", None), "num_experts": experts,
            "vocab_size": getattr(config, "vocab_size", None)}
