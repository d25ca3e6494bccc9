"""The RoE architectures: ``RoE<Stock>`` = ``RoEModel`` mixed into vLLM's stock class, made on first use.

vLLM's registry imports ``roe_vllm.models:RoEOlmoeForCausalLM`` lazily; this module builds that
class from the stock one (PEP 562), so no model file is forked.
"""

from __future__ import annotations

from importlib import import_module

from roe_vllm.architectures import PREFIX, SUPPORTED
from roe_vllm.model import RoEModel


def __getattr__(name: str):
    stock = name[len(PREFIX):] if name.startswith(PREFIX) else None
    if stock not in SUPPORTED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, cls_name = SUPPORTED[stock].split(":")
    base = getattr(import_module(module), cls_name)
    cls = type(name, (RoEModel, base), {"__module__": __name__, "__qualname__": name,
                                        "__doc__": f"{cls_name} with RoE members (roe_vllm/model.py)."})
    globals()[name] = cls
    return cls
