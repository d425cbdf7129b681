"""The grouped GEMM with bias + activation epilogue (``kernels.grouped_linear_bias_act``), run by
Triton's CPU interpreter against a float64 per-group loop.

The interpreter needs ``TRITON_INTERPRET=1`` before triton is imported, so the checks run in a
subprocess (the variable does not reach the rest of the suite). float32 inputs (IEEE dot) are checked
tightly, float16 to its rounding; bfloat16 is not: the interpreter's ``tl.dot`` on bf16 operands returns
garbage (triton 3.9), so bf16 is checked on the GPU only (tests/test_gpu.py). Every output element
must be written by the kernel: ``torch.empty`` is made to return NaN-filled memory in the subprocess.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = r"""
import torch
_empty = torch.empty
torch.empty = lambda *a, **k: _empty(*a, **k).fill_(float("nan"))  # an element the kernel skips shows as NaN
from fairseq_moe_infer.moe.kernels import GemmConfig, grouped_linear_bias_act, grouped_linear_config

ACTS = {"identity": lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu}


def reference(x, w, b, counts, act):
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    start = 0
    for g, c in enumerate(counts.tolist()):
        out[start:start + c] = ACTS[act](x[start:start + c].double() @ w[g].double().T + b[g].double())
        start += c
    return out, start


g = torch.Generator().manual_seed(0)
cases = [  # counts, unrouted tail, k_in, n_out, config
    ([3, 0, 37, 1, 0, 20], 13, 40, 48, GemmConfig(16, 16, 16)),  # k_in not a multiple of block_k
    ([3, 0, 37, 1, 0, 20], 13, 40, 48, GemmConfig(32, 32, 32, group_m=2)),
    ([17] * 5, 40, 64, 24, GemmConfig(16, 16, 32, group_m=3)),  # every group 2 tiles: the grid bound is tight
    ([0, 0, 50], 0, 32, 16, GemmConfig(16, 16, 16, group_m=1)),  # no tail, groups empty before a large one
    ([9], 7, 16, 40, GemmConfig(32, 32, 16)),  # one group, n_out not a multiple of block_n
    ([5, 0, 2, 11, 0, 0, 1], 3, 24, 16, None),  # the default config (block_m 64 for small groups)
]
for dtype, tol in [(torch.float32, 1e-5), (torch.float16, 3e-3)]:
    for counts, tail, k_in, n_out, cfg in cases:
        counts = torch.tensor(counts)
        n = int(counts.sum()) + tail
        x = torch.randn(n, k_in, generator=g).to(dtype)
        w = (torch.randn(len(counts), n_out, k_in, generator=g) / k_in ** 0.5).to(dtype)
        b = torch.randn(len(counts), n_out, generator=g).to(dtype)
        for act in ACTS:
            ref, routed = reference(x, w, b, counts, act)
            out = grouped_linear_bias_act(x, w, b, counts, act, config=cfg)
            assert out.shape == (n, n_out) and out.dtype == dtype
            assert not out.isnan().any(), (dtype, counts, act, "unwritten elements")
            assert (out[routed:] == 0).all(), (dtype, counts, act, "unrouted rows not zero")
            err = ((out.double() - ref).abs() / (1 + ref.abs())).max().item()
            assert err < tol, (dtype, counts.tolist(), act, cfg, err)
assert grouped_linear_config(1024, 64).block_m == 64 and grouped_linear_config(262144, 128)[:2] == (128, 256)
print("grouped gemm ok")
"""


def test_grouped_linear_bias_act_matches_float64_loop_in_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "grouped gemm ok" in out.stdout, out.stderr[-3000:]


def test_grouped_linear_bias_act_refuses_bad_arguments():
    from fairseq_moe_infer.moe.kernels import grouped_linear_bias_act

    x, w, b, c = torch.zeros(8, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.tensor([3, 5])
    with pytest.raises(ValueError, match="want"):
        grouped_linear_bias_act(x, w[:, :, :3], b, c)
    with pytest.raises(ValueError, match="same dtype"):
        grouped_linear_bias_act(x.half(), w, b, c)
    with pytest.raises(ValueError, match="contiguous"):
        grouped_linear_bias_act(x, w.transpose(1, 2).contiguous().transpose(1, 2), b, c)
    with pytest.raises(ValueError, match="activation"):
        grouped_linear_bias_act(x, w, b, c, "silu")
