"""The Triton kernels of the dynamic path, run by Triton's CPU interpreter against PyTorch (float64).

Skipped where Triton is not installed (CPU-only torch); the GPU versions of these
checks are in tests/test_gpu.py.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch
from fairseq_moe_infer.moe.kernels import bias_act_rows_, unpermute_combine
torch.manual_seed(0)
E = 5
for act, fn in [("identity", lambda t: t), ("relu", torch.relu), ("gelu", torch.nn.functional.gelu)]:
    h, b, e = torch.randn(37, 300), torch.randn(E, 300), torch.randint(0, E + 1, (37,))
    h[e == E] = float("nan")
    ref = fn(h.double() + b.double()[e.clamp(max=E - 1)])
    ref[e == E] = 0
    out = bias_act_rows_(h.clone(), b, e, act)
    assert (out.double() - ref).abs().max().item() < 1e-5, act
k, T = 2, 11
y, inv, w = torch.randn(k * T, 130), torch.randperm(k * T), torch.rand(k * T)
ref = (y.double()[inv] * w.double()[:, None]).view(k, T, 130).sum(0)
assert (unpermute_combine(y, inv, w, k).double() - ref).abs().max().item() < 1e-5
print("kernels ok")
"""


def test_kernels_match_float64_reference_in_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "kernels ok" in out.stdout, out.stderr[-3000:]
