"""RoE (Roster of Experts) inside vLLM: roe's roster as a vLLM plugin.

    from vllm import LLM, SamplingParams
    import roe_vllm
    llm = LLM(**roe_vllm.engine_args("path/to/moe", roster_size=8, tau=0.3))
    out = llm.generate(["To be"], SamplingParams(max_tokens=32, temperature=0))

Per request, ``SamplingParams(extra_args={...})`` with these flat keys (same names and meaning as
``roe.RoEConfig`` and ``roe serve``); a missing key takes the engine default:

    roster_size  int >= 1: K, members averaged at each token (member 0 is clean; 1 = the plain model)
    tau          float >= 0 (uniform over the noisy MoE layers) or a list (one value per MoE layer);
                 absent: the model's default schedule (the checkpoint's schedule.json, else 0.1), as in roe
    seed         int >= 0: keys the routing noise, as in roe (same seed, same tokens as roe's engine)
    skip_first   int >= 0: MoE layers kept clean at the start when tau is a float (default 1)
    skip_last    int >= 0: MoE layers kept clean at the end when tau is a float (default 1)
    schedule     str: a schedule registered at engine start (give tau or schedule, not both)
    experts_per_token  int in [1, E]: k experts per token for every row of the request (prefill, member 0
                 and every member), weights as the model computes them with k; absent: the model's own.
                 The MoE-PHDS dial: works at K = 1 too; k > the model's own k included (the fused MoE
                 takes its top-k from the routing's width, roe_vllm/routing.py)

Engine defaults: ``additional_config={"roe": {<the keys above>, "schedules": {name: <roe schedule
JSON dict or list of taus>}, "kernels": <bool, default true>}}`` (reaches every worker);
``kernels=False`` runs member attention and the members' mean in PyTorch instead of the compiled kernels
(roe_vllm/attention.py, roe_vllm/aggregation.py).
When it sets defaults (any key but ``schedules`` and ``kernels``), requests without extra_args run RoE
with them; otherwise they run the untouched model. Invalid settings are refused per request at admission
(ValueError offline, HTTP 400 in the server). Requests with RoE may not ask for prompt_logprobs.
With ``n > 1``, choice i runs with the RoE seed ``seed + i``, as in ``roe serve``.

Supported: OLMoE, Mixtral, Qwen3-MoE (``roe_vllm.architectures``); eager mode, tensor parallel.
Refused with the reason: DeepSeek-V2/V3 (MLA), GPT-OSS (sinks, MXFP4), speculative decoding,
pipeline / data parallel, EPLB, compiled graphs, MoE kernels that route inside the kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

from roe_vllm.architectures import roe_name

__all__ = ["LOGITS_PROCESSOR", "engine_args"]
__version__ = "0.1.0"

LOGITS_PROCESSOR = "roe_vllm.requests:RoERequests"
_ENGINE_KEYS = ("roster_size", "tau", "seed", "skip_first", "skip_last", "schedule", "experts_per_token", "schedules",
                "kernels")


def engine_args(model: str | Path | None = None, **kwargs) -> dict:
    """Keyword arguments for ``vllm.LLM(...)`` (or ``AsyncEngineArgs``) that run ``model`` with RoE.

    ``model`` None is roe's embedded default model. RoE engine settings (``roster_size``, ``tau``,
    ``seed``, ``skip_first``, ``skip_last``, ``schedule``, ``experts_per_token``, ``schedules``, ``kernels``) go to
    ``additional_config["roe"]``; every other keyword is passed to vLLM as given.
    NOTE: ``seed`` is RoE's noise seed, as everywhere in roe; vLLM's own engine seed is ``engine_seed``. Sets
    ``enforce_eager=True``, the RoE logits processor and the RoE architecture
    (``hf_overrides={"architectures": ["RoE<stock>"]}``).
    """
    if model is None:
        from roe.loading import DEFAULT_MODEL

        model = DEFAULT_MODEL
    defaults = {k: kwargs.pop(k) for k in _ENGINE_KEYS if k in kwargs}
    if "engine_seed" in kwargs:
        kwargs["seed"] = kwargs.pop("engine_seed")
    config = json.loads((Path(model) / "config.json").read_text()) if (Path(model) / "config.json").is_file() else {}
    archs = (kwargs.get("hf_overrides") or {}).get("architectures") or config.get("architectures") or []
    if not archs:
        raise ValueError(f"cannot tell the architecture of {model}: no config.json 'architectures'; "
                         "pass hf_overrides={'architectures': ['RoE<stock class>']}")
    additional = dict(kwargs.pop("additional_config", None) or {})
    if defaults:
        additional["roe"] = {**additional.get("roe", {}), **defaults}
    if "roe" in additional:
        from roe_vllm.settings import EngineSettings

        EngineSettings.parse(additional, str(model))
    processors = list(kwargs.pop("logits_processors", None) or [])
    args = {"model": str(model), "enforce_eager": True, **kwargs,
            "hf_overrides": {**(kwargs.get("hf_overrides") or {}), "architectures": [roe_name(archs[0])]},
            "logits_processors": processors + [LOGITS_PROCESSOR]}
    if additional:
        args["additional_config"] = additional
    return args
