"""vLLM's general-plugin entry point: registers the RoE architectures in every vLLM process.

It also lets the per-request check see its engine: vLLM calls a logits processor's
``validate_params(params)`` at admission with the request only, while a RoE request is valid only
against the engine's defaults, registered schedules and MoE layer count. ``register`` wraps the
admission check (``InputProcessor._validate_params``) to publish the engine config it belongs to
(``roe_vllm.requests.ADMITTING``) for the duration of the call, and salts the prefix-cache key of a
request that dials ``experts_per_token`` to another k (``roe_vllm.requests.dial_salt``): its KV cache
is the k-model's and must never be reused by a request with another k.

Parallel sampling: vLLM's ``ParentRequest`` gives its n child requests copies of the parent's
params that share one ``extra_args`` (or one shared object when the request has no sampling seed).
For a RoE request, admission pins its RoE seed (``roe_vllm.requests.choice_seeds``) and child i gets
its own params with the RoE seed + i, as ``roe serve`` gives choice i (vLLM already gives child i the
sampling seed + i when the request has one).

Nothing else changes: an engine that does not select a RoE architecture runs vLLM's stock
classes, and a request without RoE settings on a RoE engine without defaults runs the untouched
forward (roe_vllm/model.py).
"""

from __future__ import annotations

from copy import copy

from roe_vllm.architectures import PREFIX, SUPPORTED


def register() -> None:
    from vllm import ModelRegistry

    for stock in SUPPORTED:
        name = PREFIX + stock
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"roe_vllm.models:{name}")
    _publish_admitting_config()


def _publish_admitting_config() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    from roe_vllm.requests import ADMITTING

    original = InputProcessor._validate_params
    if getattr(original, "_roe_vllm", False):
        return

    def _validate_params(self, params, *args, **kwargs):
        token = ADMITTING.set(self.vllm_config)
        try:
            return original(self, params, *args, **kwargs)
        finally:
            ADMITTING.reset(token)

    _validate_params._roe_vllm = True
    InputProcessor._validate_params = _validate_params
    _salt_dialled_requests(InputProcessor)


def _salt_dialled_requests(processor_class) -> None:
    from roe_vllm.requests import choice_seeds, dial_salt

    original = processor_class.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = original(self, request_id, prompt, params, *args, **kwargs)
        salt = dial_salt(self.vllm_config, params)
        if salt is not None:
            request.cache_salt = salt if request.cache_salt is None else f"{request.cache_salt}|{salt}"
        seeds = choice_seeds(self.vllm_config, request.sampling_params)
        if seeds is not None:
            request.sampling_params = copy(request.sampling_params)  # never the caller's object
            request.sampling_params.extra_args = seeds
        return request

    processor_class.process_inputs = process_inputs
    _seed_choices()


def _seed_choices() -> None:
    """Child i of a RoE request with n > 1 gets its own params, with the RoE seed + i."""
    from vllm.v1.engine.parallel_sampling import ParentRequest

    from roe_vllm.requests import ChoiceSeeds

    original = ParentRequest._get_child_sampling_params

    def _get_child_sampling_params(self, index):
        params = original(self, index)
        seeds = self.sampling_params.extra_args
        if not isinstance(seeds, ChoiceSeeds):
            return params
        params = copy(params)  # NOTE: vLLM shares one child params object when the request has no sampling seed
        params.extra_args = seeds.choice(index)
        return params

    ParentRequest._get_child_sampling_params = _get_child_sampling_params
