"""Pure tensor functions for noisy expert selection: keyed Gumbel noise and its bookkeeping.

Shapes: T flattened rows (batch x positions as the router sees them), E experts, A experts per
token, L MoE layers.

RoE perturbs the expert *selection* of member k at position t in MoE layer l:

    idx_A = TopK(r_E + tau_l * G_E, A),     G ~ Gumbel(0, 1) i.i.d.

which, by the Gumbel-top-k trick, draws A experts without replacement from softmax(r / tau).

NOTE: the noise is a *counter-based* random stream: G is a pure function of
``(seed, member, position, layer, expert)`` computed with a SplitMix64 hash. A
``torch.Generator`` carries hidden state, so the noise a row receives would depend on how many
rows were drawn before it (other prompts in the batch, the order of the scoring chunks). A keyed
stream makes three guarantees hold by construction rather than by careful bookkeeping: a
prompt's output does not depend on its batch-mates; ``score()`` sees exactly the noise
``generate()`` sees at the same position; and the slow reference reproduces the fast path
draw for draw. Members never share noise because ``member`` is part of the key. Nothing here
touches torch's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_SAMPLING_STREAM = 0x5A3D  # a member id no roster uses: the stream for token sampling


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 torch stores (two's complement)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    z = z + _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def row_keys(seed: int | torch.Tensor, member_T: torch.Tensor, position_T: torch.Tensor) -> torch.Tensor:
    """One int64 key per row from (seed, member, position); layers and experts are mixed in later.

    ``seed`` is one int for every row or a tensor of one seed per row (rows of different requests
    share a forward); a row's key is the same either way.
    """
    seed_key = mix64(torch.as_tensor(seed, dtype=torch.int64, device=member_T.device))
    return mix64(mix64(seed_key + member_T.long()) + position_T.long())


def uniform_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) floats, open at both ends: the top 24 bits of each key, centred in their bin."""
    return (_shr(keys, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def keyed_gumbel(keys_T: torch.Tensor, layer: int | list[int], num_experts: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [T, E] for MoE layer ``layer``, a pure function of the row keys.

    Given a list of layers, returns [L, T, E] for all of them in one pass (same values).
    """
    layers = [layer] if isinstance(layer, int) else layer
    expert_E = torch.arange(num_experts, dtype=torch.int64, device=keys_T.device)
    offset_L = torch.tensor([_signed(lay * _MIX2) for lay in layers], dtype=torch.int64, device=keys_T.device)
    layer_keys_LT = mix64(keys_T[None, :] + offset_L[:, None])
    uniform_LTE = uniform_from_keys(mix64(layer_keys_LT[..., None] + expert_E))
    gumbel_LTE = -torch.log(-torch.log(uniform_LTE))
    return gumbel_LTE[0] if isinstance(layer, int) else gumbel_LTE


def sampling_uniform(seed: int | torch.Tensor, position_B: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) per prompt for drawing the next token at the given positions (one seed, or one per prompt)."""
    member_B = torch.full_like(position_B, _SAMPLING_STREAM)
    return uniform_from_keys(mix64(row_keys(seed, member_B, position_B)))


class NoiseBank:
    """Noise drawn ahead for decode steps: one hash pass per ``ahead`` positions, not per step.

    A decode step needs the noise of a few (seed, member, position) rows. Drawing them is ~50
    small tensor ops, about half a millisecond on CPU: more than some layers cost. The bank
    draws every member of the next ``ahead`` positions of each row's (seed, position) at once,
    already scaled by each layer's tau (member 0 times zero), and serves the following steps by
    indexing: a step of one prompt whose rows are members 0..K-1 gets a view of the draw, no
    copy. The values are the keyed stream's (``keyed_gumbel`` of the same keys, scaled as
    ``NoisePlan`` scales them), so a banked plan routes exactly like a direct one. Rows carry
    their own seeds (``seed`` is the default), so requests with different seeds share a bank
    and a forward. One bank serves the steps of a set of prompts that advance together; a row
    it does not cover (a prompt that joined, or the end of the draw) makes a new draw for every
    current row. The draws start 8 positions ahead and double up to ``ahead``, so short
    generations draw little extra. Draws live on the CPU; the plan moves what a router reads to
    the router's device.
    """

    BUDGET = 1 << 21  # floats held per (layers, experts) draw: about 8 MB

    def __init__(self, seed: int, members: int, ahead: int = 64) -> None:
        self.seed, self.members, self.ahead = seed, members, ahead
        self._next_ahead = min(8, ahead)
        self._draws: dict[tuple, _Draw] = {}

    def noise(self, layers: list[int], taus: list[float], num_experts: int, member_T: torch.Tensor,
              position_T: torch.Tensor, seed: int | torch.Tensor | None = None) -> torch.Tensor:
        """tau_l * G [L, T, E] of these rows (zeros for member 0), equal to a direct draw's.

        ``seed``: one for every row or one per row (default: the bank's).
        """
        key = (tuple(layers), tuple(taus), num_experts)
        positions, members = position_T.tolist(), member_T.tolist()
        seed = self.seed if seed is None else seed
        seeds = seed.tolist() if isinstance(seed, torch.Tensor) else [seed] * len(positions)
        rows = list(zip(seeds, positions, strict=True))
        draw = self._draws.get(key)
        if draw is None or not draw.covers(rows):
            draw = self._draws[key] = self._draw(layers, taus, num_experts, rows)
        if len(set(rows)) == 1 and members == list(range(self.members)):
            return draw.noise_LPME[:, draw.slot_of[rows[0]]]
        # NOTE: one index_select on the flattened (slot, member) axis: half the time of indexing two axes
        row_T = torch.tensor([draw.slot_of[row] * self.members + m for row, m in zip(rows, members, strict=True)])
        return draw.noise_LPME.flatten(1, 2).index_select(1, row_T)

    def _draw(self, layers: list[int], taus: list[float], num_experts: int, starts: list[tuple[int, int]]) -> _Draw:
        """Every member at each (seed, position) row and the ``ahead`` - 1 positions after it."""
        starts = sorted(set(starts))
        per_position = len(layers) * self.members * num_experts
        ahead = max(1, min(self._next_ahead, self.BUDGET // (per_position * len(starts))))
        self._next_ahead = min(2 * self._next_ahead, self.ahead)
        slots = sorted({(seed, p) for seed, start in starts for p in range(start, start + ahead)})
        seed_R = torch.tensor([seed for seed, _ in slots]).repeat_interleave(self.members)
        position_R = torch.tensor([p for _, p in slots]).repeat_interleave(self.members)
        member_R = torch.arange(self.members).repeat(len(slots))
        gumbel_LRE = keyed_gumbel(row_keys(seed_R, member_R, position_R), list(layers), num_experts)
        noise_LRE = scaled_noise(gumbel_LRE, member_R, taus)
        noise_LPME = noise_LRE.view(len(layers), len(slots), self.members, num_experts)
        return _Draw(noise_LPME, {row: slot for slot, row in enumerate(slots)})


@dataclass(frozen=True)
class _Draw:
    """One draw of a bank: noise [L, slots, members, E]; ``slot_of[(seed, position)]`` is that row's slot."""

    noise_LPME: torch.Tensor
    slot_of: dict[tuple[int, int], int]

    def covers(self, rows: list[tuple[int, int]]) -> bool:
        return all(row in self.slot_of for row in rows)


def scaled_noise(gumbel_LTE: torch.Tensor, member_T: torch.Tensor, taus: list[float]) -> torch.Tensor:
    """tau_l * G [L, T, E]: each layer's tau on the noisy rows, zero on member 0's."""
    tau_L1 = torch.tensor(taus, dtype=torch.float32, device=gumbel_LTE.device)[:, None]
    return gumbel_LTE * ((member_T != 0).to(torch.float32)[None, :] * tau_L1)[..., None]


@dataclass(frozen=True, kw_only=True)
class NoisePlan:
    """What the routers of one forward need: the (seed, member, position) of every row, and the temperatures.

    ``member_T`` and ``position_T`` follow the flattened row order the routers see
    (batch-major, then sequence); ``seed`` is one int for every row or a [T] tensor of one
    seed per row. ``tau_L`` has one entry per MoE layer. Member 0 rows are never noisy;
    ``noisy_weights`` selects the gate-weight variant (see adapters/base.py). ``bank`` (decode)
    serves the noise from draws made ahead; without it each plan draws its own.
    """

    seed: int | torch.Tensor
    member_T: torch.Tensor
    position_T: torch.Tensor
    tau_L: tuple[float, ...]
    noisy_weights: bool = False
    bank: NoiseBank | None = None
    _drawn: dict = field(default_factory=dict, repr=False, compare=False)

    def noise(self, layer: int, logits_TE: torch.Tensor) -> torch.Tensor | None:
        """tau_l * G on the noisy rows, exact zeros on the clean ones; None if the layer is clean.

        The first call draws the noise of every noisy layer with the same expert count at once
        (one pass of the hash instead of one per layer); later calls read it.
        """
        tau = self.tau_L[layer]
        if tau == 0.0:
            return None
        num_experts = logits_TE.shape[-1]
        if (layer, num_experts) not in self._drawn:
            layers = [i for i, t in enumerate(self.tau_L) if t != 0.0 and (i, num_experts) not in self._drawn]
            taus = [self.tau_L[i] for i in layers]
            if self.bank is not None:
                noise_LTE = self.bank.noise(layers, taus, num_experts, self.member_T, self.position_T, self.seed)
            else:
                gumbel_LTE = keyed_gumbel(row_keys(self.seed, self.member_T, self.position_T), layers, num_experts)
                noise_LTE = scaled_noise(gumbel_LTE, self.member_T, taus)
            self._drawn.update({(i, num_experts): noise_LTE[j] for j, i in enumerate(layers)})
        return self._drawn[(layer, num_experts)].to(device=logits_TE.device, dtype=logits_TE.dtype)

    @classmethod
    def for_rows(cls, *, seed: int | torch.Tensor, member_T: torch.Tensor, position_T: torch.Tensor,
                 tau_L: tuple[float, ...], noisy_weights: bool = False, bank: NoiseBank | None = None) -> NoisePlan:
        seed = seed.long().reshape(-1) if isinstance(seed, torch.Tensor) else seed
        return cls(seed=seed, member_T=member_T.long(), position_T=position_T.long(), tau_L=tau_L,
                   noisy_weights=noisy_weights, bank=bank)
