"""GPU checks (run on the device machine): grouped GEMM (torch._grouped_mm and the fused Triton one) and static ==
dynamic in bf16/fp16."""

import pytest
import torch

from fairseq_moe_infer.moe import MoELayer
from fairseq_moe_infer.moe.experts import grouped_gemm_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _layer(dtype, E=16, d=256, f=512, k=2):
    torch.manual_seed(0)
    layer = MoELayer(d, f, E, k=k, eval_capacity_token_fraction=1.0).cuda().to(dtype).eval()
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 2])
def test_static_equals_dynamic_on_gpu(dtype, k):
    layer = _layer(dtype, k=k)
    x = torch.randn(1024, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        y_static = layer(x)
        assert layer.last_stats.dropped.item() == 0
        layer.set_gating("dynamic")
        y_dynamic = layer(x)
    # same routing (same dtype), so the only differences are rounding in the expert GEMMs
    err = ((y_dynamic.double() - y_static.double()).norm() / y_static.double().norm()).item()
    assert err < 1e-2, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_mm_matches_float64_reference_forward_and_backward(dtype):
    layer = _layer(dtype)
    if not grouped_gemm_available(layer.experts.fc1_weight):
        pytest.skip("torch._grouped_mm not available on this GPU")
    layer.train()
    counts = torch.tensor([0, 5, 17, 0, 64, 1, 2, 3, 100, 0, 7, 9, 11, 13, 200, 24], device="cuda")
    n = int(counts.sum())
    x = torch.randn(n + 10, 256, device="cuda", dtype=dtype, requires_grad=True)
    expert_of_row = torch.cat([torch.repeat_interleave(torch.arange(16, device="cuda"), counts),
                               torch.full((10,), 16, device="cuda")])
    y = layer.experts.forward_grouped(x, counts, expert_of_row)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    # independent reference: per-expert float64 loop with its own autograd
    params = {k: getattr(layer.experts, k).detach().double().requires_grad_() for k in
              ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")}
    xd = x.detach().double().requires_grad_()
    ref = torch.zeros(n + 10, 256, dtype=torch.float64, device="cuda")
    start = 0
    for e, c in enumerate(counts.tolist()):
        h = torch.relu(xd[start:start + c] @ params["fc1_weight"][e].T + params["fc1_bias"][e])
        ref[start:start + c] = h @ params["fc2_weight"][e].T + params["fc2_bias"][e]
        start += c
    (ref * g.double()).sum().backward()
    assert y[n:].abs().max().item() == 0.0

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(y[:n], ref[:n]) < 1e-2
    assert rel(x.grad[:n], xd.grad[:n]) < 2e-2
    for k, p in params.items():
        assert rel(getattr(layer.experts, k).grad, p.grad) < 2e-2, k


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fairseq_train_expert_parallel_on_two_gpus_equals_one(tmp_path):
    """fairseq's own launcher (--distributed-world-size 2, NCCL, torch DDP) == 1 GPU with --update-freq 2."""
    import subprocess

    from .helpers import ok, run_on_free_port, tool
    from .test_fairseq_expert_parallel import ARGS

    args = [str(a) for a in ARGS if a != "--cpu"]
    two = run_on_free_port(tool("train") + args + ["--save-dir", str(tmp_path / "two"), "--distributed-world-size", "2",
                                                   "--ddp-backend", "pytorch_ddp"])
    one = subprocess.run(tool("train") + args + ["--save-dir", str(tmp_path / "one"), "--update-freq", "2",
                                                 "--distributed-world-size", "1"],
                         capture_output=True, text=True, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "0"})
    assert "expert parallelism over 2 ranks" in ok(two)
    ok(one)
    ref = torch.load(tmp_path / "one" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    got = torch.load(tmp_path / "two" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=0, atol=1e-4, msg=k)
    # --fp16 with flattened fp32 gradients would mix experts: refused with one line; no-flatten trains
    bad = run_on_free_port(tool("train") + args + ["--save-dir", str(tmp_path / "bad"), "--distributed-world-size", "2",
                                                   "--fp16"])
    assert bad.returncode != 0 and "--fp16-no-flatten-grads" in bad.stderr + bad.stdout
    ok(run_on_free_port(tool("train") + args + ["--save-dir", str(tmp_path / "fp16"), "--distributed-world-size", "2",
                                                "--fp16", "--fp16-no-flatten-grads"]))


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_fused_kernels_match_pytorch(activation):
    from fairseq_moe_infer.moe import kernels

    if kernels.triton is None:
        pytest.skip("Triton not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    E, n = 7, 1000
    h = torch.randn(300, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(E, n, device="cuda", dtype=torch.bfloat16, generator=g)
    e = torch.randint(0, E + 1, (300,), device="cuda", generator=g)
    h[e == E] = float("nan")  # unrouted rows hold garbage after a grouped GEMM; they must come out 0
    ref = h.double() + b.double()[e.clamp(max=E - 1)]
    ref = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "identity": lambda t: t}[activation](ref)
    ref[e == E] = 0
    out = kernels.bias_act_rows_(h.clone(), b, e, activation)
    assert (out.double() - ref).abs().max().item() < 0.07  # one bf16 rounding of values ~|4|
    assert out[e == E].abs().max().item() == 0.0
    k, T = 2, 257
    y = torch.randn(k * T, n, device="cuda", dtype=torch.bfloat16, generator=g)
    inverse = torch.randperm(k * T, device="cuda", generator=g)
    w = torch.rand(k * T, device="cuda", generator=g).to(torch.bfloat16)
    ref = (y.double()[inverse] * w.double()[:, None]).view(k, T, n).sum(0)
    assert (kernels.unpermute_combine(y, inverse, w, k).double() - ref).abs().max().item() < 0.05


def test_dynamic_layer_captures_in_a_cuda_graph():
    layer = _layer(torch.bfloat16)
    layer.set_gating("dynamic")
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = layer(x).clone()
        static_x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        x2 = torch.randn_like(x)
        static_x.copy_(x2)
        graph.replay()
        assert torch.equal(static_y, layer(x2))
        static_x.copy_(x)
        graph.replay()
        assert torch.equal(static_y, eager)



def _routed_rows(E, tokens, unrouted, g):
    """Top-2 routing of ``tokens`` tokens from random gate logits with a per-expert skew (uneven groups):
    counts [E] int64 of the first 2 * tokens - unrouted rows (the rest: unrouted), expert of each row."""
    logits = torch.randn(tokens, E, device="cuda", generator=g) + torch.randn(E, device="cuda", generator=g)
    experts = logits.topk(2, dim=1).indices.flatten()[: 2 * tokens - unrouted].sort().values
    counts = torch.bincount(experts, minlength=E)
    return counts, torch.cat([experts, torch.full((unrouted,), E, device="cuda")])


@pytest.mark.parametrize("E,d,f", [(64, 1024, 4096), (128, 1024, 4096), (128, 2048, 8192)])
def test_grouped_linear_bias_act_matches_grouped_mm_on_paper_shapes(E, d, f):
    """The fused grouped GEMM (bias + activation epilogue) == torch._grouped_mm + bias_act_rows_, bf16,
    4,096 tokens top-2 with 100 unrouted rows, fc1 (gelu) then fc2 (identity); a sample of rows also
    against float64."""
    from fairseq_moe_infer.moe import kernels

    if kernels.triton is None or not grouped_gemm_available(torch.zeros(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("needs Triton and torch._grouped_mm (compute capability 9.0)")
    g = torch.Generator(device="cuda").manual_seed(0)
    counts, expert_of_row = _routed_rows(E, 4096, 100, g)
    routed = 2 * 4096 - 100
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(2 * 4096, d, device="cuda", dtype=torch.bfloat16, generator=g)
    for k_in, n_out, act in ((d, f, "gelu"), (f, d, "identity")):
        w = (torch.rand(E, n_out, k_in, device="cuda", generator=g) * 2 - 1).div_(k_in ** 0.5).to(torch.bfloat16)
        b = (torch.rand(E, n_out, device="cuda", generator=g) * 2 - 1).div_(k_in ** 0.5).to(torch.bfloat16)
        ref = kernels.bias_act_rows_(torch._grouped_mm(x, w.transpose(1, 2), offs=offs), b, expert_of_row, act)
        for config in (None, kernels.GemmConfig(64, 128, 64), kernels.GemmConfig(128, 128, 64, num_warps=8, num_stages=3)):
            out = kernels.grouped_linear_bias_act(x, w, b, counts, act, config=config)
            assert out[routed:].abs().max().item() == 0.0
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            assert err < 1e-2, (act, config, err)
        rows = torch.randint(0, routed, (16,), generator=torch.Generator().manual_seed(0)).tolist()
        exact = torch.stack([x[r].double() @ w[e].double().T + b[e].double() for r, e in
                             zip(rows, expert_of_row[rows].tolist())])
        exact = torch.nn.functional.gelu(exact) if act == "gelu" else exact
        assert ((out[rows].double() - exact).norm() / exact.norm()).item() < 1e-2
        x = ref  # fc2 reads fc1's output


def test_grouped_linear_bias_act_captures_in_a_cuda_graph():
    """No host sync: captured once, replayed with other counts (set in place) it equals eager calls."""
    from fairseq_moe_infer.moe import kernels

    if kernels.triton is None:
        pytest.skip("Triton not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    E, d, f = 16, 256, 512
    x = torch.randn(1000, d, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(E, f, d, device="cuda", generator=g).div_(16).to(torch.bfloat16)
    b = torch.randn(E, f, device="cuda", dtype=torch.bfloat16, generator=g)
    counts = _routed_rows(E, 500, 40, g)[0]
    kernels.grouped_linear_bias_act(x, w, b, counts, "relu")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = kernels.grouped_linear_bias_act(x, w, b, counts, "relu")
    for unrouted in (0, 40, 999):
        counts.copy_(_routed_rows(E, 500, unrouted, g)[0])
        graph.replay()
        assert torch.equal(static_y, kernels.grouped_linear_bias_act(x, w, b, counts, "relu")), unrouted


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fp16_expert_parallel_checkpoint_resumes_on_one_gpu_and_back(tmp_path):
    """--fp16 --fp16-no-flatten-grads (fairseq's FP16Optimizer: Adam on fp32 copies) with NCCL: the 2-GPU
    checkpoint holds all 4 experts' Adam moments; one GPU resumes it at its update, and 2 GPUs resume that."""
    import subprocess

    from fairseq_moe_infer.moe import is_expert_key

    from .helpers import ok, run_on_free_port, tool
    from .test_fairseq_expert_parallel import ARGS

    args = [str(a) for a in ARGS if a != "--cpu"] + ["--optimizer", "adam", "--lr", "1e-3", "--fp16",
                                                     "--fp16-no-flatten-grads", "--save-dir", str(tmp_path)]
    env1 = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "0"}
    ok(run_on_free_port(tool("train") + args + ["--distributed-world-size", "2", "--ddp-backend", "pytorch_ddp"]))
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    names = [k for k in state["model"] if is_expert_key(k)]
    moments = [v["exp_avg"] for v in state["last_optimizer_state"]["state"].values()]
    assert names and sum(1 for m in moments if m.shape[0] == 4 and m.dim() >= 2) >= 2  # fc1/fc2 weight stacks, all 4
    one = ok(subprocess.run(tool("train") + args + ["--max-update", "8", "--distributed-world-size", "1", "--update-freq",
                                                    "2"], capture_output=True, text=True, env=env1))
    assert "@ 6 updates" in one
    two = ok(run_on_free_port(tool("train") + args + ["--max-update", "10", "--distributed-world-size", "2",
                                                      "--ddp-backend", "pytorch_ddp"]))
    assert "@ 8 updates" in two


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gating", ["dynamic", "static"])
@pytest.mark.parametrize("policy", ["lifo", "lru"])
def test_expert_buffering_on_gpu_equals_resident(dtype, gating, policy):
    """Buffered experts (pinned host memory, 4 of 16 in device slots, side-stream copies) give the
    all-resident layer's outputs; copies are counted and the device holds a quarter of the experts.

    Dynamic gating: bit-identical. Static gating: on the H200 (2026-11-30, float32) the batched
    matmul over the K slot stack and over all E experts rounded differently (cuBLAS picks its
    kernel by batch count), so static is compared to float rounding; see README "Expert buffering"."""
    import copy

    from fairseq_moe_infer.inference import configure_buffering

    plain = _layer(dtype)
    plain.set_gating(gating, 1.0)
    buffered = copy.deepcopy(plain)
    configure_buffering(buffered, 4, policy)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for n in (8, 300, 2048, 5):
            x = torch.randn(n, 256, device="cuda", dtype=dtype, generator=g)
            if gating == "dynamic":
                assert torch.equal(buffered(x), plain(x)), n
            else:
                tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(buffered(x), plain(x), rtol=tol, atol=tol, msg=str(n))
    b = buffered.experts.buffer
    assert all(h.is_pinned() for h in b.host) and b.slots[0].is_cuda
    s = b.stats()
    assert s["misses"] >= 16 and s["bytes_copied_h2d"] == s["misses"] * b.bytes_per_expert
    assert 4 * s["device_bytes_buffered"] == s["device_bytes_all_resident"] and s["copy_s"] > 0


def _gpu_generate_args() -> list:
    """fairseq-generate --fp16 of the bundled MT model on the tiny test set (dynamic gating, beam 5)."""
    import os

    from .helpers import ASSETS, TINY_MT, USER_DIR

    return [TINY_MT, "--user-dir", USER_DIR, "--task", "moe_translation", "--path",
            os.path.join(ASSETS, "checkpoints", "mt_moe", "checkpoint.pt"), "--source-lang", "src", "--target-lang", "tgt",
            "--gen-subset", "test", "--beam", "5", "--max-tokens", "2048", "--post-process", "sentencepiece",
            "--moe-gating", "dynamic", "--fp16"]


def _hypotheses(text: str) -> list:
    return sorted(line for line in text.splitlines() if line[:2] in ("H-", "D-", "P-"))


def test_generate_with_expert_buffering_on_gpu_gives_the_same_translations():
    """fairseq-generate --fp16 on the GPU: buffered (K=3, LIFO and LRU) hypotheses equal the all-resident ones."""
    from .helpers import ok, run

    args, hyps = _gpu_generate_args(), _hypotheses

    plain = hyps(ok(run("generate", args)))
    assert len(plain) >= 3 * 45
    for policy in ("lifo", "lru"):
        assert hyps(ok(run("generate", args + ["--moe-expert-buffer-size", "3", "--moe-buffer-policy", policy]))) == plain


@pytest.mark.parametrize("prefetch", ["gate", "previous-step"])
def test_prefetch_and_cpu_experts_on_gpu(prefetch):
    """Prefetching on the side stream (a call waits for a prefetched slot's copy) gives the all-resident
    outputs bit for bit (bf16, dynamic gating); CPU experts (every miss on the CPU, from pinned host
    weights) equal them to bf16 rounding of a CPU vs a GPU matmul."""
    import copy

    from fairseq_moe_infer.inference import configure_buffering

    from .test_prefetch import _Stack

    plain = _Stack().to("cuda", torch.bfloat16)
    model = copy.deepcopy(plain)
    configure_buffering(model, 4, "lifo", prefetch=prefetch)
    on_cpu = copy.deepcopy(plain)
    configure_buffering(on_cpu, 4, "lifo", prefetch=prefetch, cpu_experts="auto")
    for i in (1, 3):  # fixed rates: the CPU is as fast as the GPU, so a miss runs there below B / (2 d s) = 33.5 rows
        on_cpu.decoder.layers[i].moe_layer.experts.buffer.cpu_rates = {"cpu_flops_per_s": 2e14}
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for n in (4, 12, 3, 1):  # at most 24 tokens, so at most 24 rows per expert
            x = torch.randn(2, n, 16, device="cuda", dtype=torch.bfloat16, generator=g)
            pad = torch.zeros(2, n, dtype=torch.bool, device="cuda")
            ref = plain(x, pad)
            assert torch.equal(model(x, pad), ref), n
            torch.testing.assert_close(on_cpu(x, pad), ref, rtol=2e-2, atol=2e-2, msg=str(n))
    s = model.decoder.layers[3].moe_layer.experts.buffer.stats()
    assert s["prefetches"] > 0 and s["copy_s"] > 0 and s["misses_saved"] == s["misses_without_prefetch"] - s["misses"]
    c = on_cpu.decoder.layers[3].moe_layer.experts.buffer.stats()
    assert c["cpu_runs"] > 0 and c["misses"] == 0


def test_generate_with_prefetch_on_gpu_gives_the_same_translations():
    """fairseq-generate --fp16 on the GPU with --moe-prefetch gate / previous-step (K=3): the all-resident hypotheses."""
    from .helpers import ok, run

    args, hyps = _gpu_generate_args(), _hypotheses

    plain = hyps(ok(run("generate", args)))
    for prefetch in ("gate", "previous-step"):
        assert hyps(ok(run("generate", args + ["--moe-expert-buffer-size", "3", "--moe-prefetch", prefetch]))) == plain


def test_moe_layer_replayed_from_cuda_graphs_equals_eager():
    """--moe-cuda-graph-max-tokens on the GPU: calls padded to power-of-two buckets and replayed from
    captured graphs give the eager layer's outputs (bf16 rounding: the gate and expert GEMMs run on
    more rows) and the same counters; calls above the limit stay eager."""
    import copy

    plain = _layer(torch.bfloat16)
    plain.set_gating("dynamic")
    graphed = copy.deepcopy(plain)
    graphed.set_cuda_graphs(64)
    g = torch.Generator(device="cuda").manual_seed(0)
    exact = 0
    with torch.no_grad():
        for n in (5, 1, 64, 33, 3, 100, 7, 64):
            x = torch.randn(n, 256, device="cuda", dtype=torch.bfloat16, generator=g)
            pad = torch.rand(n, device="cuda", generator=g) < 0.2
            y, ref = graphed(x, pad), plain(x, pad)
            torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2, msg=str(n))
            assert (y[pad] == 0).all()
            exact += torch.equal(y, ref)
    assert graphed.graphs.buckets == [1, 4, 8, 64] and graphed.graphs.replays == 7
    assert graphed.eval_totals() == plain.eval_totals()
    print(f"bit-identical calls: {exact} of 8")


def test_generate_with_cuda_graphs_gives_the_same_translations_to_rounding():
    """fairseq-generate --fp16 with --moe-cuda-graph-max-tokens 256: inside the graphs the expert GEMMs are
    the Triton kernel (fp16), not cuBLAS's, so scores differ by rounding and near-ties may pick another
    word: at least 90% of the sentences get the eager run's translation, with scores within 0.01."""
    from .helpers import ok, run

    def by_id(text):
        return {line.split("\t")[0]: line.split("\t")[1:] for line in text.splitlines() if line.startswith("D-")}

    args = _gpu_generate_args()
    plain = by_id(ok(run("generate", args)))
    graphed = by_id(ok(run("generate", args + ["--moe-cuda-graph-max-tokens", "256"])))
    assert plain.keys() == graphed.keys() and len(plain) >= 45
    same = [k for k in plain if plain[k][1] == graphed[k][1]]
    diffs = [abs(float(plain[k][0]) - float(graphed[k][0])) for k in same]
    print(f"same translation: {len(same)} of {len(plain)}; largest score difference there {max(diffs):.2e}")
    assert len(same) >= 0.9 * len(plain) and max(diffs) < 1e-2
