"""Keyed Gumbel noise and noisy top-k selection."""

import itertools

import torch

from roe.routing import NoiseBank, NoisePlan, keyed_gumbel, row_keys, sampling_uniform


def test_noise_is_a_pure_function_of_its_keys():
    keys = row_keys(3, torch.tensor([1, 2, 1]), torch.tensor([5, 5, 5]))
    a = keyed_gumbel(keys, layer=2, num_experts=8)
    b = keyed_gumbel(row_keys(3, torch.tensor([1]), torch.tensor([5])), layer=2, num_experts=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[0])
    assert not torch.equal(keyed_gumbel(keys, layer=3, num_experts=8)[0], a[0])
    assert not torch.equal(keyed_gumbel(row_keys(4, torch.tensor([1]), torch.tensor([5])), 2, 8)[0], a[0])


def test_members_never_share_noise():
    """Two members at the same position and layer must draw different noise for every expert.

    Each draw is 24 random bits; a coincidence on one expert has probability 2^-24, so equality
    across all 64 experts of any pair among 16 members cannot happen by chance: if it does,
    the member id has stopped entering the key (the bug this guards: members sharing one
    generator state and so routing identically, which silently turns RoE into K copies of one
    noisy member).
    """
    keys = row_keys(0, torch.arange(16), torch.full((16,), 11))
    noise = keyed_gumbel(keys, layer=1, num_experts=64)
    for i, j in itertools.combinations(range(16), 2):
        assert not torch.any(noise[i] == noise[j]), (i, j)


def test_clean_rows_get_exact_zeros():
    plan = NoisePlan.for_rows(seed=0, member_T=torch.tensor([0, 1, 0, 2]), position_T=torch.tensor([3, 3, 4, 4]),
                              tau_L=(0.0, 0.5))
    logits = torch.randn(4, 8)
    assert plan.noise(0, logits) is None
    noise = plan.noise(1, logits)
    assert torch.equal(noise[0], torch.zeros(8)) and torch.equal(noise[2], torch.zeros(8))
    assert (noise[1] != 0).all() and (noise[3] != 0).all()


def test_uniforms_are_uniform():
    u = sampling_uniform(0, torch.arange(200_000))
    assert 0 < float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = len(u) / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50  # 19 dof: P(chi2 > 50) ~ 1e-4


def _pair_chi2(noise_tau: float, law_tau: float, n: int = 60_000) -> float:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    keys = row_keys(9, torch.ones(n, dtype=torch.long), torch.arange(n))
    noisy = logits + noise_tau * keyed_gumbel(keys, layer=0, num_experts=5)
    chosen = noisy.topk(2, dim=-1).indices.sort(dim=-1).values
    p = torch.softmax(logits / law_tau, dim=0)
    chi2 = 0.0
    for i, j in itertools.combinations(range(5), 2):
        expected = n * float(p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]))
        observed = int(((chosen[:, 0] == i) & (chosen[:, 1] == j)).sum())
        chi2 += (observed - expected) ** 2 / expected
    return chi2


def test_noisy_topk_samples_without_replacement_from_tempered_softmax():
    """Gumbel-top-k on logits + tau * G draws A experts without replacement from softmax(logits / tau).

    The selection frequencies of every unordered pair are compared with the exact law
    P({i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j) by a chi-square test (9 dof; 33.7 is
    the 1e-4 tail). The noise is keyed, so the test is deterministic. The same test rejects a
    mis-scaled temperature, so it has the power to catch one.
    """
    assert _pair_chi2(0.7, 0.7) < 33.7
    assert _pair_chi2(0.7, 1.0) > 33.7


def test_bank_serves_the_keyed_stream_across_redraws():
    """Decode steps read noise drawn ahead; every step must get exactly the direct draw, also when a
    step crosses the end of a draw, prompts sit at different positions, and E is not a multiple
    of the vector width."""
    tau_L = (0.0, 0.4, 0.0, 0.7)
    for num_experts, start_B in itertools.product((32, 5), ([4, 40], [9])):
        bank = NoiseBank(seed=7, members=3, ahead=16)
        position_B = torch.tensor(start_B)
        logits = torch.randn(3 * len(position_B), num_experts)
        for _ in range(40):
            member_T = torch.arange(3).repeat(len(position_B))
            position_T = position_B.repeat_interleave(3)
            banked = NoisePlan.for_rows(seed=7, member_T=member_T, position_T=position_T, tau_L=tau_L, bank=bank)
            direct = NoisePlan.for_rows(seed=7, member_T=member_T, position_T=position_T, tau_L=tau_L)
            for layer in (1, 3):
                noise = banked.noise(layer, logits)
                assert torch.equal(noise, direct.noise(layer, logits))
                assert noise[member_T == 0].eq(0).all() and noise[member_T != 0].ne(0).all()
            position_B = position_B + 1
        assert len(bank._draws) == 1  # layers 1 and 3 were drawn together, once per refill


def test_bank_serves_one_prompts_members_without_a_copy():
    """The decode step of one prompt (rows = members 0..K-1 at one position) reads a view of the
    draw; other row sets (a subset of members, reordered members) get a gathered copy."""
    bank = NoiseBank(seed=3, members=4)
    tau_L = (0.5, 0.0)
    logits = torch.randn(4, 8)

    def banked(member_T):
        plan = NoisePlan.for_rows(seed=3, member_T=member_T, position_T=torch.full_like(member_T, 12),
                                  tau_L=tau_L, bank=bank)
        return plan.noise(0, logits)

    view = banked(torch.arange(4))
    draw = next(iter(bank._draws.values()))
    assert view.data_ptr() >= draw.noise_LPME.data_ptr()
    assert view.untyped_storage().data_ptr() == draw.noise_LPME.untyped_storage().data_ptr()
    for member_T in (torch.tensor([2, 0, 1, 3]), torch.tensor([1, 3])):
        copy = banked(member_T)
        assert copy.untyped_storage().data_ptr() != draw.noise_LPME.untyped_storage().data_ptr()
        assert torch.equal(copy, view[member_T])
