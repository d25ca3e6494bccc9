"""Which vLLM model classes RoE runs on, what each is called with RoE, and how many MoE layers it has.

A RoE architecture is the stock vLLM class with ``RoEModel`` mixed in (roe_vllm/model.py),
registered under ``"RoE" + name`` and chosen with ``hf_overrides={"architectures": [...]}``: the
stock classes stay untouched. Families are listed only once tested (tiny random checkpoints in
vllm_plugin/tests); the refused ones name what is missing.
"""

from __future__ import annotations

PREFIX = "RoE"

# stock architecture -> "module:Class" of vLLM's implementation
SUPPORTED = {
    "OlmoeForCausalLM": "vllm.model_executor.models.olmoe:OlmoeForCausalLM",
    "MixtralForCausalLM": "vllm.model_executor.models.mixtral:MixtralForCausalLM",
    "Qwen3MoeForCausalLM": "vllm.model_executor.models.qwen3_moe:Qwen3MoeForCausalLM",
}

REFUSED = {
    "DeepseekV3ForCausalLM": "MLA attention (member rows would attend over the compressed latent KV cache, "
                             "which roe_vllm's member attention does not read) and grouped routing with a "
                             "correction bias untested",
    "DeepseekV2ForCausalLM": "MLA attention (member attention over the latent KV cache is not implemented)",
    "GptOssForCausalLM": "attention sinks in member attention, and the MXFP4 MoE kernels that route inside the "
                         "kernel (monolithic), are not implemented",
}


def roe_name(architecture: str) -> str:
    """The RoE architecture for a stock one; raises with the reason when it is not supported."""
    if architecture.startswith(PREFIX) and architecture[len(PREFIX):] in SUPPORTED:
        return architecture
    if architecture in SUPPORTED:
        return PREFIX + architecture
    if architecture in REFUSED:
        raise ValueError(f"RoE on vLLM does not support {architecture}: {REFUSED[architecture]}")
    raise ValueError(f"RoE on vLLM does not support {architecture} (untested); supported: {sorted(SUPPORTED)}")


def num_moe_layers(hf_config) -> int | None:
    """MoE layers of a model from its config (the frontend checks requests with it); None if unknown.

    The model counts its routers at load and refuses to start if this disagrees.
    """
    archs = [a[len(PREFIX):] if a.startswith(PREFIX) else a for a in (getattr(hf_config, "architectures", None) or [])]
    layers = getattr(hf_config, "num_hidden_layers", None)
    if not archs or layers is None or archs[0] not in SUPPORTED:
        return None
    if archs[0] == "Qwen3MoeForCausalLM":
        dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
        step = getattr(hf_config, "decoder_sparse_step", 1) or 1
        experts = getattr(hf_config, "num_experts", 0) or 0
        return sum(1 for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
    return layers


def moe_experts(hf_config) -> tuple[int, int] | None:
    """(experts per MoE layer, the model's own experts per token) from its config; None if unknown.

    The frontend checks ``experts_per_token`` with it; the routers check it against their own at load.
    """
    archs = [a[len(PREFIX):] if a.startswith(PREFIX) else a for a in (getattr(hf_config, "architectures", None) or [])]
    if not archs or archs[0] not in SUPPORTED:
        return None
    experts = getattr(hf_config, "num_local_experts" if archs[0] == "MixtralForCausalLM" else "num_experts", None)
    top_k = getattr(hf_config, "num_experts_per_tok", None)
    return (experts, top_k) if experts and top_k else None
