"""Fused steps of the dynamic path (Triton; CUDA, inference only).

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

A third fuses the bias pass into the GEMM itself:

* :func:`grouped_linear_bias_act` -- a grouped GEMM with the bias, the
  activation and the zeroing of unrouted rows in its epilogue,
  ``out[r] = act(x[r] @ weight[g]^T + bias[g])``, so one GEMM plus
  :func:`bias_act_rows_` become one kernel that writes its output once. Its
  tile table (M-tile -> group, first row, last row) is computed on the device
  from the group counts inside every program, over a grid fixed by the shapes:
  no host sync, CUDA-graph capturable. Not used by the layer yet (measured
  against ``torch._grouped_mm`` + :func:`bias_act_rows_` by
  ``benchmarks/bench_grouped_gemm.py``).

The first two are used only where :func:`fused_available` says so (CUDA tensor, Triton
importable, no gradient needed); elsewhere the callers keep their PyTorch code,
which computes the same function (tested against each other on the GPU:
``tests/test_gpu.py``).
"""

from typing import NamedTuple, Optional

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

    @triton.jit
    def _grouped_linear_kernel(x_ptr, w_ptr, b_ptr, counts_ptr, out_ptr, n_rows, n_out, k_in, n_groups,
                               stride_x, stride_wg, stride_wn, stride_bg, stride_o,
                               ACT: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr, GROUPS_P2: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP_M: tl.constexpr):
        # program -> (M-tile, N-tile), M-tiles taken GROUP_M at a time so that programs running
        # together share x rows and weight columns in L2 (the Triton matmul tutorial's order)
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(n_rows, BLOCK_M) + n_groups  # upper bound of the real M-tiles, tail included
        tiles_n = tl.cdiv(n_out, BLOCK_N)
        band = GROUP_M * tiles_n
        first_m = (pid // band) * GROUP_M
        band_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % band) % band_m
        pid_n = (pid % band) // band_m
        # tile table, recomputed by every program from the device-side counts (no host sync, no
        # extra launch): group g owns M-tiles [tile_end[g] - tiles[g], tile_end[g]), rows [row_end[g] - c[g], row_end[g])
        gi = tl.arange(0, GROUPS_P2)
        c = tl.load(counts_ptr + gi, mask=gi < n_groups, other=0).to(tl.int64)
        tiles = (c + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(tiles, 0)
        row_end = tl.cumsum(c, 0)
        g = tl.sum((tile_end <= pid_m).to(tl.int32), 0)  # first group whose tiles end past pid_m
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        if g >= n_groups:
            # unrouted tail rows [sum(c), n_rows), in M-tiles after the groups' tiles: written as zeros;
            # programs past the last tail tile store nothing
            rows = tl.sum(c, 0) + (pid_m - tl.sum(tiles, 0)) * BLOCK_M + tl.arange(0, BLOCK_M)
            zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], zero,
                     mask=(rows < n_rows)[:, None] & col_ok[None, :])
            return
        own = gi == g
        r_end = tl.sum(tl.where(own, row_end, 0), 0)
        rows = (tl.sum(tl.where(own, row_end - c, 0), 0)
                + (pid_m - tl.sum(tl.where(own, tile_end - tiles, 0), 0)) * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = rows < r_end
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + rows[:, None] * stride_x + ks[None, :]
        # B tile [BLOCK_K, BLOCK_N] read straight from the [n_out, k_in] weight (k contiguous)
        b_ptrs = w_ptr + g.to(tl.int64) * stride_wg + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = ks < k_in - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        acc += tl.load(b_ptr + g.to(tl.int64) * stride_bg + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:
            acc = tl.maximum(acc, 0.0)
        if ACT == 2:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


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


class GemmConfig(NamedTuple):
    """Tile shape and launch parameters of :func:`grouped_linear_bias_act`: an M-tile of
    ``block_m`` rows of one group times ``block_n`` output columns, ``block_k`` deep per step;
    ``group_m`` M-tiles share a band of programs (L2 reuse); Triton's ``num_warps``/``num_stages``."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4


# Measured on the H200 (benchmarks/results/grouped_gemm_h200.json, bf16, three paper shapes, 512-131,072
# tokens, top-2): with at most 64 rows per group this kernel (64 x 128 x 64 tiles) takes 0.98-0.79x the
# time of torch._grouped_mm + bias_act_rows_ (fc1 + fc2: 1.01-1.27x faster on the 128-expert shapes,
# 0.99x at 64 experts); with 128+ rows per group cuBLAS/CUTLASS's grouped GEMM is faster (this kernel
# 0.64-0.94x), so the layer uses it only up to this mean.
FUSED_GEMM_MAX_ROWS_PER_GROUP = 64  # used inside CUDA graphs only (Experts._grouped_mm)


def grouped_linear_config(n_rows: int, n_groups: int) -> GemmConfig:
    """The default tile config of :func:`grouped_linear_bias_act`, from the mean rows per group
    (a host-side shape, no sync). Small groups (decoding, many experts) are weight-read bound: 64-row
    M-tiles, 8 M-tiles per band for L2 reuse, 4 warps (the best of the configs swept on the H200 at
    <= 64 rows per group, ``benchmarks/results/grouped_gemm_h200.json``); large groups are compute
    bound: 128 x 256 tiles, 8 warps (the best swept there, still 0.86-0.94x torch._grouped_mm)."""
    mean = n_rows / max(n_groups, 1)
    if mean <= 96:
        return GemmConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=4)
    return GemmConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3)


def grouped_linear_bias_act(x: Tensor, weight: Tensor, bias: Tensor, counts: Tensor, activation: str = "identity",
                            config: Optional[GemmConfig] = None) -> Tensor:
    """One grouped GEMM with the bias and activation in its epilogue:
    ``out[r] = act(x[r] @ weight[g]^T + bias[g])`` for the rows ``r`` of group ``g``, zeros for unrouted rows.

    Replaces ``torch._grouped_mm`` + :func:`bias_act_rows_` (one fewer pass over the [N, n_out] output).
    Group ``g`` owns rows ``[offs[g-1], offs[g])``, ``offs = cumsum(counts)``; rows from ``offs[-1]`` on are
    unrouted. The kernel's grid is fixed by the shapes (``cdiv(N, block_m) + G`` M-tiles, an upper bound,
    times ``cdiv(n_out, block_n)``) and every program finds its group, first row and last row from
    ``counts`` on the device (as vLLM's ``moe_align_block_size`` table, without its extra launch); programs
    past the last tile store nothing. No host sync: CUDA-graph capturable.

    Args:
        x: [N, k_in] bf16/fp16 (fp32 also: IEEE fp32 dot, for tests), rows sorted by group, row-major.
        weight: [G, n_out, k_in], ``nn.Linear`` layout per group (``fc1_weight`` [G, f, d], ``fc2_weight``
            [G, d, f]), k contiguous (read as is, never transposed or copied); same dtype as x.
        bias: [G, n_out], same dtype.
        counts: [G] int64 rows per group, on x's device, ``counts.sum() <= N`` (not checked: no sync).
        activation: ``identity`` | ``relu`` | ``gelu`` (erf form, ``torch.nn.functional.gelu``'s default).
        config: tile config; default :func:`grouped_linear_config` (a benchmark sweeps others).

    Returns:
        New [N, n_out] tensor in x's dtype; accumulated in float32, bias and activation in float32,
        one rounding on store.

    Raises:
        ValueError: mismatched shapes, dtypes or devices, a non-contiguous k dimension, an unknown activation.
    """
    n_rows, k_in = x.shape
    n_groups, n_out = bias.shape
    if weight.shape != (n_groups, n_out, k_in) or counts.shape != (n_groups,):
        raise ValueError(f"grouped_linear_bias_act: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{tuple(bias.shape)}, counts {tuple(counts.shape)}: want [N, k], [G, n, k], [G, n], [G]")
    if not (x.dtype == weight.dtype == bias.dtype) or len({x.device, weight.device, bias.device, counts.device}) > 1:
        raise ValueError("grouped_linear_bias_act: x, weight, bias (same dtype) and counts must be on one device")
    if x.stride(1) != 1 or weight.stride(2) != 1 or bias.stride(1) != 1:
        raise ValueError("grouped_linear_bias_act: x, weight and bias must be contiguous along their last dimension")
    if activation not in ACTIVATIONS:
        raise ValueError(f"grouped_linear_bias_act: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    out = torch.empty(n_rows, n_out, dtype=x.dtype, device=x.device)
    if n_rows == 0 or n_out == 0:
        return out
    cfg = config or grouped_linear_config(n_rows, n_groups)
    grid = ((triton.cdiv(n_rows, cfg.block_m) + n_groups) * triton.cdiv(n_out, cfg.block_n),)
    _grouped_linear_kernel[grid](
        x, weight, bias, counts, out, n_rows, n_out, k_in, n_groups,
        x.stride(0), weight.stride(0), weight.stride(1), bias.stride(0), out.stride(0),
        ACT=ACTIVATIONS[activation], IEEE=x.dtype == torch.float32, EVEN_K=k_in % cfg.block_k == 0,
        GROUPS_P2=max(2, triton.next_power_of_2(n_groups)), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
