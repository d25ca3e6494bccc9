"""The router patch: wrappers on a model's router instances, and the routing context of a forward.

Shapes: T flattened rows as a router sees them, E experts.

``RouterPatch.install`` replaces each router instance's ``forward`` by a wrapper that runs the
model's own router, then re-selects experts (the slot's rule, roe/adapters) with the noise of the
current forward; ``uninstall`` deletes the wrappers, so the model's modules are exactly as before.

The noise reaches the wrappers through an explicit context of the forward: the caller runs the
model inside ``routing(patch, plan)``. A wrapper reads the plan only when the context names its
own patch, so two patches stacked on one model (two rosters open together) never both apply one
forward's noise, and a forward outside any context (the user's own call) is left as the model
computes it, unless the patch dials ``experts_per_token``: then every clean row is re-selected
with k experts too. The context is a ``ContextVar``: each thread (the server's worker) has its own.

This module knows nothing about members, schedules or caches: a ``NoisePlan`` (roe/routing.py)
says what each row's noise is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from roe.adapters import RouterSlot
from roe.routing import NoisePlan

_FORWARD: ContextVar[tuple[RouterPatch, NoisePlan | None] | None] = ContextVar("roe_forward", default=None)

STACKED = ("a roster with experts_per_token cannot be open on a model together with another roster; "
           "close the other one first")


@contextmanager
def routing(patch: RouterPatch, plan: NoisePlan | None) -> Iterator[None]:
    """The forwards inside this block are ``patch``'s, with ``plan``'s noise (None: every row clean)."""
    token = _FORWARD.set((patch, plan))
    try:
        yield
    finally:
        _FORWARD.reset(token)


class RouterPatch:
    """The wrappers of one roster on its routers (its own dialled copies of the analysed slots)."""

    def __init__(self, slots: list[RouterSlot]) -> None:
        self.slots = slots
        self.installed = False

    @property
    def dialled(self) -> bool:
        return any(slot.dialled for slot in self.slots)

    def plan(self) -> NoisePlan | None:
        """The plan of the current forward when it is this patch's (else None: clean rows)."""
        context = _FORWARD.get()
        return context[1] if context is not None and context[0] is self else None

    def install(self) -> None:
        self.check_stacking()
        for slot in self.slots:
            original = slot.module.forward

            def forward(*args, _slot=slot, _original=original, **kwargs):
                output = _original(*args, **kwargs)
                plan = self.plan()
                if plan is None and not _slot.dialled:
                    return output
                return self._reroute(_slot, plan, output, args, kwargs)

            forward.roe_dialled = slot.dialled  # read by check_stacking
            slot.saved_forward = slot.module.__dict__.get("forward")
            slot.module.forward = forward
        self.installed = True

    def _reroute(self, slot: RouterSlot, plan: NoisePlan | None, output, args, kwargs):
        """The router's output with its experts re-selected under ``plan``'s noise (zeros for a dial)."""
        logits_TE = slot.rule.logits(slot.module, output)
        noise_TE = None if plan is None else plan.noise(slot.layer, logits_TE)
        if noise_TE is None:
            if not slot.dialled:
                return output
            noise_TE = torch.zeros_like(logits_TE)  # experts_per_token: clean rows re-select too
        noisy = plan is not None and plan.noisy_weights
        return slot.rule.reroute(slot.module, output, noise_TE, noisy, args, kwargs)

    def check_stacking(self) -> None:
        """Patches on one model at once wrap each other's routers. A dialled wrapper re-selects
        every forward's clean rows, also those of the other roster, so it cannot share the model."""
        for slot in self.slots:
            other = slot.module.__dict__.get("forward")
            if other is not None and (slot.dialled or getattr(other, "roe_dialled", False)):
                raise RuntimeError(STACKED)

    def uninstall(self) -> None:
        """Remove the wrappers (and restore any instance forward that was there)."""
        for slot in self.slots:
            if slot.saved_forward is None:
                slot.module.__dict__.pop("forward", None)
            else:
                slot.module.forward = slot.saved_forward
        self.installed = False
