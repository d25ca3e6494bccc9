"""Attention of the member rows: the request's stored clean history plus the member's own key/value.

Shapes: M member rows, R RoE requests, J member slots per request (K - 1, padded to the largest),
H query heads, G = H / Hkv query heads per KV head, Q = J * G query rows per KV head, X history
slots (whole blocks), Y = X + 1 (the member's own key), D head dim.

    out_m = softmax([q_m . K_hist(<p) , q_m . k_m] * scale) @ [V_hist(<p) ; v_m]

The clean rows go through vLLM's own attention first, which writes their keys/values (so a
member of a prefill's last chunk also sees that chunk's earlier tokens); the member rows then
read the paged cache through the request's block table and write nothing: the KV cache holds
the clean sequence only, whatever K is (roe's clean cache, roe/cache.py).

Two implementations: ``member_attention`` (PyTorch, the reference) and a compiled kernel
(``member_attention.cpp``, built once per environment like roe's decode kernel, roe/kernels.py), which
reads each history key and value once per (request, KV head) straight from the cache blocks in one
call per layer. The PyTorch form costs about 1.7 ms per layer at K = 8 on the default model (some
25 small tensor ops and a gather of the history); it runs where the kernel cannot be built or
with ``kernels=False`` (roe_vllm/settings.py). ``attend`` chooses; tests hold the two together.

NOTE: the CPU cache layout is not the nominal [blocks, Hkv, block, 2 * D]: the kernels of some
ISAs store keys dimension-major inside a block. ``cpu_layout`` finds the layout by writing known
keys/values through vLLM's own ``cpu_attn_reshape_and_cache`` once per (ISA, shape), and reading
them back, so the member rows read exactly what the clean attention reads.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from roe.kernels import Kernel
from roe_vllm.members import Step

KERNEL = Kernel("roe_vllm_member_attention", Path(__file__).with_name("member_attention.cpp"),
                ("member_attention",), "RoE's member-attention kernel", "PyTorch member attention",
                headers=(Path(__file__).with_name("avx2_exp.h"),))


@functools.cache
def kernel():
    """The compiled member attention of this environment (built on first use, with a line on stderr), or None."""
    return KERNEL.load_or_build()


def check_layer(layer) -> None:
    """Refuse attention features the member attention does not implement (at model start-up)."""
    impl = getattr(layer, "impl", None)
    if type(impl).__name__ != "CPUAttentionBackendImpl":
        raise ValueError(f"RoE on vLLM: layer {layer.layer_name} runs the {type(impl).__name__} attention backend; "
                         "member attention reads only the CPU backend's paged KV layout (CPU_ATTN) so far")
    what = []
    if getattr(impl, "sinks", None) is not None:
        what.append("attention sinks")
    if getattr(impl, "alibi_slopes", None) is not None:
        what.append("ALiBi")
    if getattr(impl, "logits_soft_cap", 0) not in (0, None):
        what.append("logit soft-capping")
    if str(getattr(layer, "kv_cache_dtype", "auto")) != "auto":
        what.append(f"a quantized KV cache ({layer.kv_cache_dtype})")
    if getattr(layer, "attn_type", "decoder") not in ("decoder",):
        what.append(f"{layer.attn_type} attention")
    if what:
        raise ValueError(f"RoE on vLLM: layer {layer.layer_name} uses {', '.join(what)}, which member attention "
                         "does not implement")


@functools.cache
def cpu_layout(isa: str, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype) -> tuple[bool, bool]:
    """(keys dimension-major, values dimension-major) inside a CPU cache block, found by probing."""
    from vllm import _custom_ops as ops

    cache = torch.zeros(1, num_kv_heads, 2 * block_size, head_dim, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    key_BHD = torch.arange(block_size * num_kv_heads * head_dim, dtype=torch.float32).view(
        block_size, num_kv_heads, head_dim).to(dtype)
    value_BHD = key_BHD + 0.5
    ops.cpu_attn_reshape_and_cache(key_BHD, value_BHD, key_cache, value_cache,
                                   torch.arange(block_size, dtype=torch.long), isa)
    major = []
    for stored, given_BHD in ((key_cache, key_BHD), (value_cache, value_BHD)):
        flat_HX = stored[0].reshape(num_kv_heads, -1)
        if torch.equal(flat_HX, given_BHD.permute(1, 0, 2).reshape(num_kv_heads, -1)):
            major.append(False)
        elif torch.equal(flat_HX, given_BHD.permute(1, 2, 0).reshape(num_kv_heads, -1)):
            major.append(True)
        else:
            raise ValueError(f"RoE on vLLM: unknown CPU KV cache layout for ISA {isa!r}")
    return major[0], major[1]


def _as_layout(half_NHBD: torch.Tensor, dim_major: bool) -> torch.Tensor:
    """The key or value half of a CPU cache as [blocks, Hkv, D, block] when stored dimension-major."""
    if not dim_major:
        return half_NHBD
    N, H, B, D = half_NHBD.shape
    stride = half_NHBD.stride()
    return half_NHBD.as_strided((N, H, D, B), (stride[0], stride[1], B, 1), half_NHBD.storage_offset())


def _slots(cache_NH__: torch.Tensor, dim_major: bool, blocks_RN: torch.Tensor, length: int) -> torch.Tensor:
    """[R, Hkv, D, X] (dim_major) or [R, Hkv, X, D] of the given blocks: X = ``length`` within one block, else
    all their slots. One block is cut to its first ``length`` slots before the copy."""
    R, N = blocks_RN.shape
    if N == 1:
        return cache_NH__[blocks_RN[:, 0], :, :, :length] if dim_major else cache_NH__[blocks_RN[:, 0], :, :length]
    got = cache_NH__[blocks_RN.reshape(-1)]  # [R*N, Hkv, D, B] or [R*N, Hkv, B, D]
    H, B = got.shape[1], got.shape[-1] if dim_major else got.shape[-2]
    if dim_major:
        return got.view(R, N, H, -1, B).permute(0, 2, 3, 1, 4).reshape(R, H, -1, N * B)
    return got.view(R, N, H, B, -1).permute(0, 2, 1, 3, 4).reshape(R, H, N * B, -1)


def history(layer, kv_cache: torch.Tensor, block_table: torch.Tensor, step: Step, length: int):
    """Keys [R, Hkv, D, X] and values [R, Hkv, X, D] of the RoE requests' first ``length`` positions
    (X = ``length`` when they fit in one block, else the slots of the blocks; ``_mask`` hides the
    slots past each request's own history). Keys stored dimension-major come out as [D, X] directly.
    """
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    head_dim = two_d // 2
    key_half, value_half = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    keys_major, values_major = cpu_layout(layer.isa, num_kv_heads, block_size, head_dim, kv_cache.dtype)
    blocks_RN = step.blocks(block_table, max(1, -(-length // block_size)))
    keys = _slots(_as_layout(key_half, keys_major), keys_major, blocks_RN, length)
    values = _slots(_as_layout(value_half, values_major), values_major, blocks_RN, length)
    return keys if keys_major else keys.transpose(-1, -2), values.transpose(-1, -2) if values_major else values


def _mask(step: Step, length: int, window: int | None) -> torch.Tensor | None:
    """Additive mask [R, 1, 1, P]: 0 where a request's history position is visible, -inf after its own
    position (batch-mates have longer histories) or outside a sliding window; None when nothing is hidden."""
    key = ("mask", length, window)
    if key not in step.cache:
        position_R = torch.tensor([r.position for r in step.requests])
        slot_P = torch.arange(length)
        keep_RP = slot_P[None, :] < position_R[:, None]
        if window is not None and window > 0:
            keep_RP &= slot_P[None, :] > position_R[:, None] - window
        step.cache[key] = None if bool(keep_RP.all()) else \
            torch.zeros(keep_RP.shape).masked_fill_(~keep_RP, float("-inf"))[:, None, None, :]
    return step.cache[key]


def _by_request(step: Step, rows_MX: torch.Tensor) -> torch.Tensor:
    """Member rows [M, ...] as [R, J, ...]: a view when every request has the same K, else zero-padded."""
    R, J = len(step.requests), step.members_per_request
    if step.uniform:
        return rows_MX.view(R, J, *rows_MX.shape[1:])
    padded = rows_MX.new_zeros(R, J, *rows_MX.shape[1:])
    return padded.index_put_((step.request_M, step.member_M - 1), rows_MX)


def member_attention(layer, query_MHD: torch.Tensor, key_MHD: torch.Tensor, value_MHD: torch.Tensor,
                     step: Step, attn_metadata, kv_cache: torch.Tensor) -> torch.Tensor:
    """Attention output [M, H, D] of the member rows (see the module docstring), in fp32."""
    M, H, D = query_MHD.shape
    Hkv = key_MHD.shape[1]
    G = H // Hkv
    R, J = len(step.requests), step.members_per_request
    P = max(r.position for r in step.requests)
    keys_RHDX, values_RHXD = history(layer, kv_cache, attn_metadata.block_table, step, P)
    X = keys_RHDX.shape[-1]
    f32 = torch.float32
    q_RJHD = _by_request(step, query_MHD.to(f32))
    k_RJHD, v_RJHD = _by_request(step, key_MHD.to(f32)), _by_request(step, value_MHD.to(f32))
    # query rows grouped by KV head: Q = J * G rows per (request, KV head)
    q_RHQD = q_RJHD.view(R, J, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(R, Hkv, J * G, D)
    scale = layer.impl.scale
    scores_RHQX = torch.matmul(q_RHQD, keys_RHDX.to(f32)).mul_(scale)
    mask = _mask(step, X, getattr(layer.impl, "sliding_window", -1))
    if mask is not None:
        scores_RHQX += mask
    own_RHQ1 = (q_RJHD.view(R, J, Hkv, G, D) * k_RJHD[:, :, :, None, :]).sum(-1).mul_(scale)
    own_RHQ1 = own_RHQ1.permute(0, 2, 1, 3).reshape(R, Hkv, J * G, 1)
    probs_RHQY = torch.softmax(torch.cat([scores_RHQX, own_RHQ1], dim=-1), dim=-1)
    v_own_RHQD = v_RJHD[:, :, :, None, :].expand(R, J, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(R, Hkv, J * G, D)
    out_RHQD = torch.matmul(probs_RHQY[..., :X], values_RHXD.to(f32))
    out_RHQD += probs_RHQY[..., X:] * v_own_RHQD
    out_RJHD = out_RHQD.view(R, Hkv, J, G, D).permute(0, 2, 1, 3, 4).reshape(R, J, H, D)
    out_MHD = out_RJHD.reshape(M, H, D) if step.uniform else out_RJHD[step.request_M, step.member_M - 1]
    return out_MHD.to(query_MHD.dtype)


def attend(layer, query_MHD: torch.Tensor, key_MHD: torch.Tensor, value_MHD: torch.Tensor, step: Step,
           attn_metadata, kv_cache: torch.Tensor, compiled) -> torch.Tensor:
    """Member attention [M, H, D] through the compiled kernel ``compiled`` (None: PyTorch's ``member_attention``)."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    if compiled is None or kv_cache.stride(3) != 1 or kv_cache.stride(2) != two_d:
        return member_attention(layer, query_MHD, key_MHD, value_MHD, step, attn_metadata, kv_cache)
    keys_major, values_major = cpu_layout(layer.isa, num_kv_heads, block_size, two_d // 2, kv_cache.dtype)
    P = max(r.position for r in step.requests)
    blocks_RN = step.blocks(attn_metadata.block_table, max(1, -(-P // block_size)))
    first_R, position_R = step.offsets()
    f32 = torch.float32
    out_MHD = compiled.member_attention(
        query_MHD.to(f32).contiguous(), key_MHD.to(f32).contiguous(), value_MHD.to(f32).contiguous(), kv_cache,
        blocks_RN.contiguous(), first_R, position_R, block_size, keys_major, values_major, float(layer.impl.scale),
        int(getattr(layer.impl, "sliding_window", -1) or -1))
    return out_MHD.to(query_MHD.dtype)


if __name__ == "__main__":  # python -m roe_vllm.attention: build the kernel now (make vllm does)
    import sys

    state = "ready" if kernel() else "not available; member attention uses PyTorch"
    print(f"roe-vllm: member-attention kernel {state}", file=sys.stderr)
