"""The per-request RoE settings of a running batch, carried to the model by a vLLM logits processor.

vLLM's V1 logits processors see every change of the persistent batch (``update_state``) before
each forward, in the batch's row order, which is also the order of the requests' token rows in
the forward. ``RoERequests`` keeps, per batch row, the request's raw ``extra_args`` and prompt
length; the model (roe_vllm/model.py) resolves them against its MoE layer count. The processor
never changes logits: the model's ``compute_logits`` writes the averaged distribution.

``validate_params`` refuses invalid RoE settings per request at admission (a 400 in the server),
so an engine never sees them.

The table also answers, per forward, the experts per token of every token row (``experts_per_row``):
a request that dials ``experts_per_token`` runs all its rows with that k, prefill chunks included, so
its KV cache holds the history of the model with k (roe_vllm/routing.py reads it in every router).
NOTE: such a KV cache differs from the model's own, so ``cache_salt`` gives those requests their own
prefix-cache keys (plugin.py sets it at admission): a prefix computed with one k is never reused with another.

Parallel sampling (``n`` > 1): vLLM fans a request out into n child requests that share one
``extra_args``, so every choice would run the same RoE noise. As in ``roe serve``, choice i runs with
the RoE seed ``seed + i``: at admission the request's seed is pinned (the engine default resolved) in
``ChoiceSeeds``, and each child gets its own ``extra_args`` with its seed (plugin.py).
"""

from __future__ import annotations

import json
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from roe_vllm.settings import REQUEST_KEYS, EngineSettings, check_request

# NOTE: vLLM builds the logits processor and the model separately, from copies of one VllmConfig
# (``dataclasses.replace`` gives a copy a new ``instance_id``, measured with AsyncLLM) that share their
# sub-configs; this registry (the engine's CacheConfig object -> processor, weak) is how the model
# finds its engine's batch table. The processor holds the CacheConfig, so its id is not reused.
MAX_SEED = 1 << 63  # roe's noise keying takes seeds in [0, 2**63)
_TABLES: weakref.WeakValueDictionary[int, RoERequests] = weakref.WeakValueDictionary()
# The engine config of the request being admitted (set around vLLM's admission check, plugin.py):
# ``validate_params`` receives only the request, but the check needs the engine's defaults and layers.
ADMITTING: ContextVar = ContextVar("roe_vllm_admitting", default=None)


@dataclass
class Entry:
    """One request in the batch: its RoE keys (resolved once by the model) and prompt length."""

    extra_args: dict | None
    prompt_len: int | None
    experts_per_token: int | None = None  # the k all its rows select (None: the model's own)
    roster: Any = None
    resolved: bool = False


class RoERequests(LogitsProcessor):
    """Batch row -> the request's RoE settings; logits untouched."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.engine = EngineSettings.parse(vllm_config.additional_config, vllm_config.model_config.model)
        self.rows: dict[int, Entry] = {}
        self.seen = False  # the model read the batch in the current step (``apply`` checks it)
        self.dialled = False  # some request of the batch dials experts_per_token
        self._dial: tuple[Any, torch.Tensor] | None = None  # (the forward context, its rows' k [T])
        self._engine_key = vllm_config.cache_config
        _TABLES[id(self._engine_key)] = self

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        vllm_config = ADMITTING.get() or get_current_vllm_config_or_none()
        model_config = getattr(vllm_config, "model_config", None)
        engine = engine_settings(vllm_config)
        num_layers = experts = None
        if model_config is not None:
            from roe_vllm.architectures import moe_experts, num_moe_layers

            num_layers, experts = num_moe_layers(model_config.hf_config), moe_experts(model_config.hf_config)
        check_request(engine, sampling_params, num_layers, experts)
        cfg, n = engine.config(sampling_params.extra_args), getattr(sampling_params, "n", 1) or 1
        if cfg is not None and cfg.seed + n - 1 >= MAX_SEED:
            raise ValueError(f"RoE seed {cfg.seed} with n={n}: choice i runs with seed + i, which must stay "
                             f"below 2**63")

    def is_argmax_invariant(self) -> bool:
        return False  # so that ``apply`` also runs on greedy batches, where it checks the model saw the batch

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits untouched; refuses to go on if the model ran a batch with RoE requests without reading
        them (it would have returned plain logits for them: never silently)."""
        seen, self.seen = self.seen, False
        if not seen and any(self.engine.enabled or (e.extra_args and any(k in REQUEST_KEYS for k in e.extra_args))
                            for e in self.rows.values()):
            raise RuntimeError("RoE: the model did not read this engine's RoE requests (is the RoE architecture "
                               "selected? roe_vllm.engine_args selects it)")
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._entry)
        self.dialled = any(e.experts_per_token is not None for e in self.rows.values())
        self._dial = None

    def _entry(self, params, prompt_tok_ids, output_tok_ids) -> Entry | None:
        extra = params.extra_args if params is not None else None
        return Entry(extra_args=dict(extra) if extra else None,
                     prompt_len=len(prompt_tok_ids) if prompt_tok_ids is not None else None,
                     experts_per_token=self.engine.experts_per_token(extra))

    def experts_per_row(self) -> torch.Tensor | None:
        """k of every token row of the current forward [T] (0: the model's own); None when no request dials.

        Request i of the batch owns rows ``query_start_loc[i]:query_start_loc[i + 1]``; computed once per
        forward (the routers of all MoE layers share it).
        """
        if not self.dialled:
            return None
        from vllm.forward_context import get_forward_context

        context = get_forward_context()
        if self._dial is not None and self._dial[0] is context:
            return self._dial[1]
        metadata = context.attn_metadata
        if not metadata:
            return None
        metadata = next(iter(metadata.values())) if isinstance(metadata, dict) else metadata
        start_N1 = metadata.query_start_loc.cpu()
        k_N = torch.tensor([(self.rows[i].experts_per_token or 0) if i in self.rows else 0
                            for i in range(start_N1.shape[0] - 1)], dtype=torch.long)
        k_T = torch.repeat_interleave(k_N, (start_N1[1:] - start_N1[:-1]).long())
        self._dial = (context, k_T)
        return k_T


_ENGINES: dict[tuple[str, str | None], EngineSettings] = {}


def engine_settings(vllm_config) -> EngineSettings:
    """The engine's RoE settings (None config: none), parsed once per (additional_config, model).

    Admission asks for them several times per request (validation, dial salt, choice seeds); parsing
    reads the checkpoint's schedule.json and checks every registered schedule.
    """
    model_config = getattr(vllm_config, "model_config", None)
    additional = vllm_config.additional_config if vllm_config is not None else None
    key = (json.dumps(additional, sort_keys=True, default=str), getattr(model_config, "model", None))
    if key not in _ENGINES:
        _ENGINES[key] = EngineSettings.parse(additional, key[1])
    return _ENGINES[key]


def dial_salt(vllm_config, params) -> str | None:
    """The prefix-cache salt of a request that dials another k than the model's own (None: no salt).

    Its KV cache is the k-model's; requests with the same k share theirs, and no other request reads it.
    """
    from roe_vllm.architectures import moe_experts

    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:
        return None
    engine = engine_settings(vllm_config)
    k = engine.experts_per_token(getattr(params, "extra_args", None))
    experts = moe_experts(model_config.hf_config)
    if k is None or (experts is not None and k == experts[1]):
        return None
    return f"roe-experts-per-token={k}"


class ChoiceSeeds(dict):
    """The ``extra_args`` of a RoE request with n > 1, its RoE seed pinned: choice i runs with seed + i."""

    def choice(self, index: int) -> dict:
        return {**self, "seed": self["seed"] + index}


def choice_seeds(vllm_config, params) -> ChoiceSeeds | None:
    """The ``extra_args`` that give a RoE request's n choices their seeds (None: not a RoE request with n > 1).

    Only on a RoE engine: a stock engine's requests keep their ``extra_args`` as given.
    """
    from roe_vllm.architectures import PREFIX

    model_config = getattr(vllm_config, "model_config", None)
    if (getattr(params, "n", 1) or 1) <= 1 or not getattr(model_config, "architecture", "").startswith(PREFIX):
        return None
    cfg = engine_settings(vllm_config).config(params.extra_args)
    return None if cfg is None else ChoiceSeeds({**(params.extra_args or {}), "seed": cfg.seed})


def table_for(vllm_config) -> RoERequests | None:
    table = _TABLES.get(id(vllm_config.cache_config))
    return table if table is not None and table._engine_key is vllm_config.cache_config else None
