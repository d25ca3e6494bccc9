"""One forward's member rows: which clean row each copies, its (member, position), and its noise.

Shapes: T clean rows of the forward, M member rows, R RoE requests in it, E experts, L MoE layers.

For every RoE request whose last scheduled token is sampled this step (a decode step, or the
last chunk of a prefill), members 1..K-1 are rows appended after the T clean rows, at the
position of that token (member 0 is the clean row itself). They are appended where they start to
differ: at the input of the first noisy MoE block of the batch (``fan_out``); every layer before
runs on the T clean rows only. The noise is roe's keyed stream: G of a row is a pure function
of (seed, member, position, MoE layer, expert) (roe/routing.py), scaled by the request's tau of
that layer, so the vLLM engine and roe's transformers engine draw the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from roe.routing import keyed_gumbel, row_keys
from roe_vllm.settings import Roster


@dataclass(frozen=True)
class Request:
    """A RoE request of this forward: its batch row, its sampled token's row and position, its roster."""

    index: int
    row: int
    position: int
    roster: Roster


@dataclass
class Step:
    """The member rows of one forward, built before it runs; ``wide`` once they have been appended."""

    rows: int
    requests: list[Request]
    source_M: torch.Tensor  # clean row each member row copies
    member_M: torch.Tensor
    position_M: torch.Tensor
    request_M: torch.Tensor  # index into ``requests``
    fan_out: int  # MoE layer whose block input gets the member rows
    wide: bool = False
    _noise: dict = field(default_factory=dict)

    @classmethod
    def build(cls, rows: int, requests: list[Request]) -> Step:
        member_M = torch.cat([torch.arange(1, r.roster.members) for r in requests])
        request_M = torch.cat([torch.full((r.roster.members - 1,), i) for i, r in enumerate(requests)])
        row_R = torch.tensor([r.row for r in requests])
        position_R = torch.tensor([r.position for r in requests])
        return cls(rows=rows, requests=requests, source_M=row_R[request_M], member_M=member_M,
                   position_M=position_R[request_M], request_M=request_M,
                   fan_out=min(r.roster.first_noisy for r in requests))

    @property
    def num_members(self) -> int:
        return self.member_M.shape[0]

    def widen(self, tensor: torch.Tensor) -> torch.Tensor:
        """A per-row tensor of the T clean rows, with the member rows (copies of their sources) appended."""
        return torch.cat([tensor, tensor.index_select(0, self.source_M.to(tensor.device))])

    def noise(self, layer: int, num_experts: int) -> torch.Tensor | None:
        """tau_l * G [M, E] of the member rows at MoE layer ``layer``; None when every member is clean there.

        The first call draws all noisy layers at once (one pass of the hash), as roe's NoisePlan does.
        """
        if (layer, num_experts) not in self._noise:
            self._draw(num_experts)
        return self._noise[(layer, num_experts)]

    def _draw(self, num_experts: int) -> None:
        tau_RL = torch.tensor([r.roster.tau_L for r in self.requests], dtype=torch.float32)
        tau_ML = tau_RL[self.request_M]
        layers = [i for i in range(tau_RL.shape[1]) if bool((tau_RL[:, i] > 0).any())]
        keys_M = torch.cat([row_keys(r.roster.seed, self.member_M[self.request_M == i],
                                     self.position_M[self.request_M == i]) for i, r in enumerate(self.requests)])
        gumbel_LME = keyed_gumbel(keys_M, layers, num_experts) if layers else None
        for layer in range(tau_RL.shape[1]):
            if layer in layers:
                # the same product as roe's scaled_noise: G * (1.0 * tau_l), member rows are never member 0
                noise_ME = gumbel_LME[layers.index(layer)] * tau_ML[:, layer, None]
                self._noise[(layer, num_experts)] = noise_ME
            else:
                self._noise[(layer, num_experts)] = None
