"""vLLM's general-plugin entry point: registers the RoE architectures in every vLLM process.

Nothing else changes: an engine that does not select a RoE architecture runs vLLM's stock
classes, and a request without RoE settings on a RoE engine without defaults runs the untouched
forward (roe_vllm/model.py).
"""

from __future__ import annotations

from roe_vllm.architectures import PREFIX, SUPPORTED


def register() -> None:
    from vllm import ModelRegistry

    for stock in SUPPORTED:
        name = PREFIX + stock
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"roe_vllm.models:{name}")
