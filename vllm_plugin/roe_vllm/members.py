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
from itertools import groupby

import torch

from roe.routing import NoiseBank
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
    banks: dict  # (seed, K) -> roe NoiseBank: noise drawn ahead for the coming positions (owned by the model)
    wide: bool = False
    _noise: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # what every layer of the step shares (slots, masks)

    @classmethod
    def build(cls, rows: int, requests: list[Request], banks: dict) -> Step:
        """Member rows grouped by roster (same seed, K and taus next to each other: one noise draw per group)."""
        requests = sorted(requests, key=lambda r: (r.roster.seed, r.roster.members, r.roster.tau_L, r.index))
        # NOTE: built as Python lists, one tensor each: once per decode step, where some 20 small tensor ops cost more
        owner = [i for i, r in enumerate(requests) for _ in range(r.roster.members - 1)]
        columns = {"request_M": owner, "member_M": [m for r in requests for m in range(1, r.roster.members)],
                   "source_M": [requests[i].row for i in owner], "position_M": [requests[i].position for i in owner]}
        return cls(rows=rows, requests=requests, **{k: torch.tensor(v, dtype=torch.long) for k, v in columns.items()},
                   fan_out=min(roster.first_noisy for roster in {r.roster for r in requests}), banks=banks)

    @property
    def num_members(self) -> int:
        return self.member_M.shape[0]

    @property
    def members_per_request(self) -> int:
        """J: the largest K - 1 of the step's requests."""
        return max(r.roster.members for r in self.requests) - 1

    @property
    def uniform(self) -> bool:
        """Every request has the same K (its member rows then form an [R, K - 1] grid)."""
        return len({r.roster.members for r in self.requests}) == 1

    def widen(self, tensor: torch.Tensor) -> torch.Tensor:
        """A per-row tensor of the T clean rows, with the member rows (copies of their sources) appended."""
        return torch.cat([tensor, tensor.index_select(0, self.source_M.to(tensor.device))])

    def offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First member row of each request [R + 1] (rows are contiguous per request) and positions [R]."""
        if "offsets" not in self.cache:
            counts_R = torch.tensor([r.roster.members - 1 for r in self.requests])
            self.cache["offsets"] = (torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts_R, 0)]),
                                     torch.tensor([r.position for r in self.requests]))
        return self.cache["offsets"]

    def request_rows(self) -> torch.Tensor:
        """The batch row (logits row) of every RoE request [R], once per step."""
        if "request_rows" not in self.cache:
            self.cache["request_rows"] = torch.tensor([r.index for r in self.requests])
        return self.cache["request_rows"]

    def blocks(self, block_table: torch.Tensor, count: int) -> torch.Tensor:
        """The first ``count`` KV blocks [R, N] of every RoE request, once per step (layers share the table)."""
        key = ("blocks", id(block_table), count)
        if key not in self.cache:
            self.cache[key] = block_table[self.request_rows(), :count].long()
        return self.cache[key]

    def noise(self, layer: int, num_experts: int) -> torch.Tensor | None:
        """tau_l * G [M, E] of the member rows at MoE layer ``layer``; None when every member is clean there.

        The first call draws all noisy layers at once (one pass of the hash), as roe's NoisePlan does.
        """
        if (layer, num_experts) not in self._noise:
            self._draw(num_experts)
        return self._noise[(layer, num_experts)]

    def _draw(self, num_experts: int) -> None:
        """Every layer's noise of every member row, from each roster group's bank (roe's NoiseBank: the
        keyed stream drawn ahead, equal to a direct ``keyed_gumbel`` draw scaled as ``scaled_noise``)."""
        num_layers = len(self.requests[0].roster.tau_L)
        parts: list[list[torch.Tensor | None]] = [[] for _ in range(num_layers)]
        first = 0  # the group's first member row: groups follow the step's order of requests
        for roster, group in groupby(self.requests, key=lambda r: r.roster):
            group = list(group)
            layers = [i for i, t in enumerate(roster.tau_L) if t > 0]
            bank = self.banks.get((roster.seed, roster.members))
            if bank is None:
                bank = self.banks[(roster.seed, roster.members)] = NoiseBank(roster.seed, roster.members)
            K, end = roster.members, first + len(group) * (roster.members - 1)
            if len(group) == 1:  # all K members at one position: the bank's no-copy path, member 0 dropped
                member_T, position_T = torch.arange(K), torch.full((K,), group[0].position)
            else:
                member_T, position_T = self.member_M[first:end], self.position_M[first:end]
            first = end
            noise_LTE = bank.noise(layers, [roster.tau_L[i] for i in layers], num_experts, member_T, position_T)
            if len(group) == 1:
                noise_LTE = noise_LTE[:, 1:]
            rows = noise_LTE.shape[1]
            for layer in range(num_layers):
                parts[layer].append(noise_LTE[layers.index(layer)] if layer in layers else
                                    torch.zeros(rows, num_experts))
        for layer in range(num_layers):
            if not any(r.roster.tau_L[layer] > 0 for r in self.requests):
                self._noise[(layer, num_experts)] = None
            else:
                noise = parts[layer]
                self._noise[(layer, num_experts)] = noise[0] if len(noise) == 1 else torch.cat(noise)
