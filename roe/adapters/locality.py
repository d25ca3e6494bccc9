"""Why no rule can exist for some routers: routing that mixes tokens.

Shapes: B batch, S positions, T = B * S rows, D hidden.

Every roe rule maps one row's logits to that row's experts. RoE relies on it: the K members of
a token are rows of one forward, and a scored position must equal the generation step that
predicts it. A router whose output for a token changes with the *other* tokens of
the forward breaks both: the members would choose one another's experts, and the untouched
model's full forward already disagrees with its own token-by-token generation, so K = 1 cannot
reproduce "the model" in scoring and generation at once. No per-row rule reproduces such a
router, however it is written.

The case in transformers 5.23: Doge's ``DogeCDMoE`` (product-key experts) reshapes its
``router_gate`` output ``[T, 2 * keys]`` as ``[2, T, keys]``, so token t's two product-key score
sets are halves of the logits of tokens t // 2 and (T + t) // 2, not its own (transformers'
comment: "this split mixes router logits across tokens ... kept as-is so existing checkpoints give
the same outputs"). Run alone (T = 1) the same code routes per token.

``token_mixing`` measures it on the router's real call (the probe's), so the refusal names
what was observed, not a class name. It runs only for a router no rule reproduced.
"""

from __future__ import annotations

from typing import Any

import torch


def _first_token(hidden: torch.Tensor) -> tuple[torch.Size, torch.Tensor]:
    """The call's leading token axes ([B, S] or [T]) and its first token with those axes kept at 1."""
    lead = hidden.shape[:2] if hidden.dim() == 3 else hidden.shape[:1]
    return lead, hidden[:1, :1] if hidden.dim() == 3 else hidden[:1]


def _token_rows(output: Any, lead: torch.Size) -> list[torch.Tensor]:
    """The first token's entries of every output tensor laid out per token ([B, S, ...] or [T, ...])."""
    tensors = [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]
    rows = []
    for t in tensors:
        if len(lead) == 2 and t.shape[:2] == lead:
            rows.append(t[:1, :1].reshape(1, -1))
        elif t.dim() >= 1 and t.shape[0] == lead.numel():
            rows.append(t[:1].reshape(1, -1))
    return rows


@torch.no_grad()
def token_mixing(router: torch.nn.Module, args: tuple, kwargs: dict) -> float | None:
    """How much the router's output for the call's first token changes when that token runs alone.

    Returns the largest change, relative to the output's scale, over the outputs laid out per
    token; None when it is within float noise (``NOISE``) or cannot be measured (one-token
    call, no hidden-state argument, the router refuses a one-token call, no per-token output).
    """
    if args and isinstance(args[0], torch.Tensor):
        hidden, call = args[0], lambda h: router(h, *args[1:], **kwargs)
    else:
        hidden, call = kwargs.get("hidden_states"), lambda h: router(*args, **{**kwargs, "hidden_states": h})
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        return None
    lead, first = _first_token(hidden)
    if lead.numel() < 2:
        return None
    try:
        full, alone = _token_rows(call(hidden), lead), _token_rows(call(first), first.shape[:len(lead)])
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None
    if not full or [t.shape for t in full] != [t.shape for t in alone]:
        return None
    change = max(_relative_change(a, b) for a, b in zip(full, alone, strict=True))
    return change if change > NOISE else None


# NOTE: a token-local router may still differ in the last bits between a T-row and a 1-row call
# (matmul blocking depends on T); mixing tokens changes the output at the scale of the output.
NOISE = 1e-3


def _relative_change(in_batch: torch.Tensor, alone: torch.Tensor) -> float:
    """max |in_batch - alone| relative to max |in_batch| (exact 0 when both are all zeros)."""
    in_batch, alone = in_batch.double(), alone.double()
    scale = in_batch.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return ((in_batch - alone).abs().max() / scale).item()


def refuse_token_mixing(router: torch.nn.Module, path: str, family: str, args: tuple, kwargs: dict) -> None:
    """Raise ValueError saying why no rule can exist when the router mixes tokens; else return."""
    change = token_mixing(router, args, kwargs)
    if change is None:
        return
    raise ValueError(
        f"{family}: router {type(router).__name__} ({path}) routes each token by the other tokens of the forward "
        f"(run alone, a token's output changes by {change:.0%} of its scale), so no per-token routing rule can "
        "reproduce it. RoE runs its K members as rows of one forward (they would choose each other's experts) and "
        "scores a position as the generation step that predicts it, but this model's own full forward already "
        f"differs from its token-by-token generation. {family} is not supported."
    )
