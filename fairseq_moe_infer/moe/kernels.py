"""Fused memory-bound steps of the dynamic path (Triton; CUDA, inference only).

Around the two grouped GEMMs the dynamic path makes several full passes over
[N, f] and [N, d] activations (N = routed rows): gather each row's expert bias,
add it, apply the activation, mask unrouted rows, gather rows back into token
order, weight them and sum the k choices. Each of these is a separate PyTorch
kernel reading and writing the whole tensor; at E=128, d=2048, f=8192 and 32k
tokens they cost 3.4 of 11.7 ms on the H200 (``benchmarks/results/profile_dynamic_h200.json``).
Two kernels replace them:

* :func:`bias_act_rows_` -- in place ``h[r] = act(h[r] + bias[e[r]])`` for
  routed rows, ``h[r] = 0`` for unrouted ones (``e[r] >= num_experts``): one
  read and one write of ``h``. Used after each expert GEMM (activation
  ``identity`` after the second).
* :func:`unpermute_combine` -- ``out[t] = sum_i w[i, t] * y[inverse[i * T + t]]``:
  one gather-read of the k rows of each token and one write, instead of a
  gather, a multiply and a reduction.

Both are used only where :func:`fused_available` says so (CUDA tensor, Triton
importable, no gradient needed); elsewhere the callers keep their PyTorch code,
which computes the same function (tested against each other on the GPU:
``tests/test_gpu.py``).
"""

from typing import Optional

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs go without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2}


def fused_available(x: Tensor, activation: Optional[str] = "identity") -> bool:
    """True where the Triton kernels can run for ``x``: CUDA, Triton present, gradients
    disabled (``torch.no_grad()``/``inference_mode``, as fairseq's eval-lm and generate run),
    and a supported activation (identity, relu, gelu (erf))."""
    return (
        triton is not None
        and x.is_cuda
        and not torch.is_grad_enabled()  # the kernels have no backward: gate or expert grads would be lost
        and activation in ACTIVATIONS
    )


if triton is not None:

    @triton.jit
    def _bias_act_kernel(h_ptr, b_ptr, e_ptr, n_cols, stride_h, stride_b, num_experts,
                         ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        e = tl.load(e_ptr + row)
        routed = e < num_experts
        load = cols < tl.where(routed, n_cols, 0)  # nothing to read for an unrouted row
        h = tl.load(h_ptr + row * stride_h + cols, mask=load, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + e * stride_b + cols, mask=load, other=0.0).to(tl.float32)
        v = h + b
        if ACT == 1:
            v = tl.maximum(v, 0.0)
        if ACT == 2:
            v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
        v = tl.where(routed, v, 0.0)
        tl.store(h_ptr + row * stride_h + cols, v.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, n_tokens, n_cols, stride_y, stride_o,
                        K: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(K):
            j = i * n_tokens + t
            src = tl.load(inv_ptr + j)
            w = tl.load(w_ptr + j).to(tl.float32)
            acc += w * tl.load(y_ptr + src * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    return min(1024, triton.next_power_of_2(n_cols))


def bias_act_rows_(h: Tensor, bias: Tensor, expert_of_row: Tensor, activation: str = "identity") -> Tensor:
    """In place: ``h[r] = act(h[r] + bias[expert_of_row[r]])``; rows whose expert is
    ``>= bias.shape[0]`` (not routed) become 0.

    Args:
        h: [N, n] bf16/fp16/fp32 CUDA, row-major (stride 1 along n).
        bias: [E_local, n], same dtype.
        expert_of_row: [N] int64 local expert of each row (E_local = unrouted).
        activation: ``identity`` | ``relu`` | ``gelu`` (erf form, fairseq's ``gelu``).

    Returns:
        ``h``. Computes in float32, rounds once on store.
    """
    n_rows, n_cols = h.shape
    if n_rows == 0:
        return h
    assert h.stride(1) == 1 and bias.stride(1) == 1, "rows must be contiguous"
    block = _block(n_cols)
    _bias_act_kernel[(n_rows, triton.cdiv(n_cols, block))](
        h, bias, expert_of_row, n_cols, h.stride(0), bias.stride(0), bias.shape[0],
        ACT=ACTIVATIONS[activation], BLOCK=block,
    )
    return h


def unpermute_combine(y_sorted: Tensor, inverse: Tensor, weights: Tensor, k: int) -> Tensor:
    """Token-order weighted sum of the k expert outputs of every token.

    Args:
        y_sorted: [N, d] expert outputs in expert-sorted order, N = k * T.
        inverse: [N] int64; choice ``j = i * T + t`` (choice-major) sits at row ``inverse[j]``.
        weights: [N] combine weights in the same choice-major order (0 for unused choices).
        k: choices per token.

    Returns:
        [T, d] in ``y_sorted``'s dtype, accumulated in float32.
    """
    n, d = y_sorted.shape
    assert y_sorted.stride(1) == 1, "rows must be contiguous"
    n_tokens = n // k
    out = torch.empty(n_tokens, d, dtype=y_sorted.dtype, device=y_sorted.device)
    if n_tokens == 0:
        return out
    block = _block(d)
    _combine_kernel[(n_tokens, triton.cdiv(d, block))](
        y_sorted, inverse, weights, out, n_tokens, d, y_sorted.stride(0), out.stride(0), K=k, BLOCK=block,
    )
    return out
