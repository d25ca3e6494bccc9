"""The per-request RoE settings of a running batch, carried to the model by a vLLM logits processor.

vLLM's V1 logits processors see every change of the persistent batch (``update_state``) before
each forward, in the batch's row order, which is also the order of the requests' token rows in
the forward. ``RoERequests`` keeps, per batch row, the request's raw ``extra_args`` and prompt
length; the model (roe_vllm/model.py) resolves them against its MoE layer count. The processor
never changes logits: the model's ``compute_logits`` writes the averaged distribution.

``validate_params`` refuses invalid RoE settings per request at admission (a 400 in the server),
so an engine never sees them.
"""

from __future__ import annotations

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
_TABLES: weakref.WeakValueDictionary[int, RoERequests] = weakref.WeakValueDictionary()
# The engine config of the request being admitted (set around vLLM's admission check, plugin.py):
# ``validate_params`` receives only the request, but the check needs the engine's defaults and layers.
ADMITTING: ContextVar = ContextVar("roe_vllm_admitting", default=None)


@dataclass
class Entry:
    """One request in the batch: its RoE keys (resolved once by the model) and prompt length."""

    extra_args: dict | None
    prompt_len: int | None
    roster: Any = None
    resolved: bool = False


class RoERequests(LogitsProcessor):
    """Batch row -> the request's RoE settings; logits untouched."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.engine = EngineSettings.parse(vllm_config.additional_config, vllm_config.model_config.model)
        self.rows: dict[int, Entry] = {}
        self.seen = False  # the model read the batch in the current step (``apply`` checks it)
        self._engine_key = vllm_config.cache_config
        _TABLES[id(self._engine_key)] = self

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        vllm_config = ADMITTING.get() or get_current_vllm_config_or_none()
        model_config = getattr(vllm_config, "model_config", None)
        engine = EngineSettings.parse(vllm_config.additional_config if vllm_config is not None else None,
                                      model_config.model if model_config is not None else None)
        num_layers = None
        if model_config is not None:
            from roe_vllm.architectures import num_moe_layers

            num_layers = num_moe_layers(model_config.hf_config)
        check_request(engine, sampling_params, num_layers)

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
        process_dict_updates(self.rows, batch_update, _entry)


def _entry(params, prompt_tok_ids, output_tok_ids) -> Entry | None:
    extra = params.extra_args if params is not None else None
    return Entry(extra_args=dict(extra) if extra else None,
                 prompt_len=len(prompt_tok_ids) if prompt_tok_ids is not None else None)


def table_for(vllm_config) -> RoERequests | None:
    table = _TABLES.get(id(vllm_config.cache_config))
    return table if table is not None and table._engine_key is vllm_config.cache_config else None
