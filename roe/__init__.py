"""roe: Roster-of-Experts inference for transformers Mixture-of-Experts language models.

    import roe
    model, tokenizer = roe.load()
    with roe.roster(model, roe.RoEConfig(roster_size=8, tau=0.1)) as r:
        ids = r.generate(input_ids, max_new_tokens=64)

NOTE: the public names are imported on first use (PEP 562), so ``import roe.routing`` (keyed noise),
``roe.schedule`` and ``roe.aggregate`` need only torch: the vLLM integration (vllm_plugin/) uses them
in a venv whose transformers is older than the one roe pins.
"""

import sys as _sys
from importlib import import_module as _import_module
from types import ModuleType as _ModuleType

_EXPORTS = {"RoEConfig": "roe.config", "Roster": "roe.roster", "Schedule": "roe.schedule", "load": "roe.loading",
            "roster": "roe.roster"}

__all__ = ["RoEConfig", "Roster", "Schedule", "load", "roster"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(_import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'roe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({n for n in globals() if not n.startswith("_")} | set(__all__) | {"__version__"})


class _Package(_ModuleType):
    """``roe.roster`` is the function, as before: importing the submodule ``roe.roster`` binds the
    module under that name on the package, which this keeps from hiding the function."""

    def __setattr__(self, name: str, value) -> None:
        if name == "roster" and isinstance(value, _ModuleType):
            value = value.roster
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
