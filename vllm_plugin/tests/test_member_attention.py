"""Member attention, both forms (PyTorch and the compiled kernel), against attention written out by hand.

The oracle keeps each request's history as plain [P, Hkv, D] tensors and computes
softmax([q . k_hist, q . k_own] * scale) @ [v_hist; v_own] head by head; the same history is written
into a paged cache (shuffled blocks, every layout the CPU kernels use), which both implementations read.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from roe_vllm import attention
from roe_vllm.members import Request, Step
from roe_vllm.settings import Roster

H, HKV, BLOCK = 6, 2, 8  # G = 3 query heads per KV head: odd row counts reach every row block


def write_cache(history, blocks, keys_major, values_major, dtype, D):
    """A paged cache [blocks, Hkv, block, 2 * D] holding each request's history in its blocks."""
    cache = torch.randn(12, HKV, 2 * BLOCK, D).to(dtype)  # garbage outside the histories
    for (keys_PHD, values_PHD), blocks_N in zip(history, blocks):
        for p in range(keys_PHD.shape[0]):
            block, slot = blocks_N[p // BLOCK], p % BLOCK
            for g in range(HKV):
                head = cache[block, g].view(-1)
                for half, vec, major in ((0, keys_PHD[p, g], keys_major), (1, values_PHD[p, g], values_major)):
                    base = half * BLOCK * D
                    index = base + torch.arange(D) * BLOCK + slot if major else base + slot * D + torch.arange(D)
                    head[index] = vec.to(dtype)
    return cache.view(12, HKV, BLOCK, 2 * D)


def by_hand(q_HD, k_own_HD, v_own_HD, keys_PHD, values_PHD, scale, window):
    position, D = keys_PHD.shape[0], q_HD.shape[-1]
    visible = [s for s in range(position) if window is None or s > position - window]
    out = torch.empty(H, D)
    for h in range(H):
        g = h // (H // HKV)
        keys = torch.stack([keys_PHD[s, g] for s in visible] + [k_own_HD[g]])
        values = torch.stack([values_PHD[s, g] for s in visible] + [v_own_HD[g]])
        out[h] = torch.softmax(keys.double() @ q_HD[h].double() * scale, 0) @ values.double()
    return out


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("layout", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [24, 64])  # the kernel's general path and its 64-wide register path
def test_member_attention_matches_attention_by_hand(monkeypatch, layout, window, dtype, D):
    torch.manual_seed(0)
    monkeypatch.setattr(attention, "cpu_layout", lambda *args: layout)
    positions, members = [21, 5, 0], [3, 6, 2]  # three requests: several blocks, one block, no history
    blocks = [[7, 2, 9], [4], [11]]
    history = [(torch.randn(p, HKV, D).to(dtype).float(), torch.randn(p, HKV, D).to(dtype).float()) for p in positions]
    cache = write_cache(history, blocks, *layout, dtype, D)
    requests = [Request(index=i, row=i, position=p, roster=Roster(members=k, tau_L=(0.1,), seed=0))
                for i, (p, k) in enumerate(zip(positions, members))]
    step = Step.build(3, requests, banks={})
    M = step.num_members
    q, k, v = torch.randn(M, H, D), torch.randn(M, HKV, D), torch.randn(M, HKV, D)
    block_table = torch.zeros(3, 4, dtype=torch.int32)
    for i, b in enumerate(blocks):
        block_table[i, :len(b)] = torch.tensor(b)
    layer = SimpleNamespace(isa="test", impl=SimpleNamespace(scale=0.3, sliding_window=window or -1))
    metadata = SimpleNamespace(block_table=block_table)

    want = torch.stack([by_hand(q[m], k[m], v[m], *history[step.requests[step.request_M[m]].index], 0.3,
                                 window) for m in range(M)])
    reference = attention.member_attention(layer, q, k, v, step, metadata, cache)
    torch.testing.assert_close(reference, want.float(), atol=1e-5, rtol=1e-5)
    compiled = attention.kernel()
    assert compiled is not None, "the member-attention kernel did not build (see stderr)"
    fast = attention.attend(layer, q, k, v, step, metadata, cache, compiled)
    torch.testing.assert_close(fast, want.float(), atol=1e-5, rtol=1e-5)


def test_attend_without_the_kernel_is_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "member_attention", lambda *args: calls.append(args) or "reference")
    cache = torch.zeros(2, HKV, BLOCK, 2 * 16)
    assert attention.attend(None, None, None, None, None, None, cache, None) == "reference" and len(calls) == 1
