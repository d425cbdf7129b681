#!/usr/bin/env python3
"""The MoE layer beside its peers: one run, the same GPU, the same shapes, the same weights.

Implementations (``--impls``; bf16, top-2, ReLU experts, one GPU, inference under ``torch.no_grad``):

* ``ours-dynamic``: this plugin's :class:`~fairseq_moe_infer.moe.MoELayer` with dynamic gating
  (sorted by expert, grouped GEMM, fused Triton kernels; drops nothing);
* ``ours-dynamic-graph``: the same captured once in a CUDA graph and replayed (GPU only);
* ``ours-static-0.25`` / ``ours-static-1.0``: fairseq's static gating, evaluation capacity
  ceil(fraction x T) per expert (0.25 is fairseq's default and drops tokens; 1.0 drops nothing);
* ``torch-loop``: a plain PyTorch per-expert loop (the Hugging Face Mixtral block's pattern:
  softmax top-2, renormalised, ``torch.where`` per expert that received tokens, ``index_add_``);
* ``tutel`` / ``tutel-cf1.0``: Tutel's ``tutel.moe.moe_layer`` (``gate_type={'type': 'top', 'k': 2,
  'fp32_gate': True, 'capacity_factor': CF}``, ``experts={'type': 'ffn', ...}``), CF = 0 (its
  dropless mode: capacity = the busiest expert's load) and 1.0 (its default: drops);
* ``megablocks-dmoe``: MegaBlocks' dropless ``megablocks.layers.dmoe.dMoE`` with
  ``mlp_impl='grouped'`` (grouped_gemm; its block-sparse ``'sparse'`` MLP refuses Triton >= 3.2)
  and ``moe_normalize_expert_weights=1`` (top-2 weights renormalised, as GShard/fairseq do);
* ``deepspeed`` / ``deepspeed-cf1.0``: DeepSpeed-MoE's ``deepspeed.moe.layer.MoE`` with an
  ``nn.Sequential(Linear, ReLU, Linear)`` expert, ``ep_size=1``, ``top2_2nd_expert_sampling=False``
  (deterministic), ``drop_tokens=False`` (dropless) or its defaults (``eval_capacity_factor=1.0``).

Same weights: one reference layer (ours, random weights, fp32 gate) is copied into every peer
(Tutel's ``batched_fc1_w [E, f, d]``, ``batched_fc2_w [E, f, d]`` = our fc2 transposed; MegaBlocks'
``w1``/``w2`` [E*f, d]; DeepSpeed's per-expert ``nn.Linear``s). Expert biases are zero for all:
MegaBlocks' experts have none. Gates compute in float32 where the peer offers it (ours, Tutel,
DeepSpeed always, the loop); MegaBlocks' router runs in bf16, so a few near-tied tokens may route
differently. Each row gives the output's largest absolute difference to ``ours-dynamic`` on the same
input and the share of tokens that differ by more than 1% of the output's largest value (a routing
difference or a dropped choice), the median time (CUDA events after warm-up, fresh random inputs
rotated, ``benchmarks.common.time_cuda``), peak activation memory (beyond weights and inputs),
dropped top-k choices (from each implementation's own counts and capacity rule), the ratio to
``ours-dynamic`` at the same point and to the roofline floor ``max(FLOPs / bf16 matmul rate,
expert weight bytes / copy rate)`` (both rates measured in the same run, as bench_moe_layer.py).

Each implementation family runs in its own process (weights and inputs are drawn from the same
seeds), so a peer that fails to import, crashes or corrupts its CUDA context is recorded with its
exact error and the others still run; the time budget is shared out between the processes.

Examples:
    python benchmarks/bench_peers.py --max-minutes 5 --out benchmarks/results/peers_h200.json
    python benchmarks/bench_peers.py --device cpu --toy --out /tmp/peers_toy.json   # CPU check of the code
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    free_memory,
    is_oom,
    log_row,
    measure_ceilings,
    median_time_s,
    reset_moe_counters,
    run_info,
    time_cuda,
    write_json,
)

GROUPS = {
    "ours": ["ours-dynamic", "ours-dynamic-graph", "ours-static-0.25", "ours-static-1.0"],
    "loop": ["torch-loop"],
    "tutel": ["tutel", "tutel-cf1.0"],
    "megablocks": ["megablocks-dmoe"],
    "deepspeed": ["deepspeed", "deepspeed-cf1.0"],
}
IMPLS = [i for names in GROUPS.values() for i in names]
GROUP_OF = {i: g for g, names in GROUPS.items() for i in names}
REFERENCE = "ours-dynamic"
CAPACITY_LIMITED = {"ours-static-0.25", "tutel-cf1.0", "deepspeed-cf1.0"}  # fixed capacity: may drop choices
DIFF_TOKEN_FRACTION = 0.01  # a token "differs" when some output feature is off by > 1% of max |reference output|


# ---------------------------------------------------------------- capacity rules (pure, tested on CPU)
def dropped_choices(counts, capacity: int) -> int:
    """Top-k choices dropped by a fixed per-expert capacity.

    Args:
        counts: [E] ints, the top-k choices routed to each expert (all k ranks together).
        capacity: slots per expert, or a value < 0 for none (dropless).

    Returns:
        sum over experts of max(0, count - capacity). GShard-style dispatchers (fairseq,
        Tutel, DeepSpeed) give the first choices the first slots and the second choices the rest,
        so whatever order they fill in, an expert keeps exactly min(count, capacity) choices.
    """
    if capacity < 0:
        return 0
    return int(sum(max(0, int(c) - capacity) for c in counts))


def tutel_capacity(tokens: int, experts: int, k: int, capacity_factor: float) -> int:
    """Tutel's per-expert capacity (``tutel/impls/fast_dispatch.py::extract_critical``) on one
    GPU (alignment 1): ``k * int(cf * ceil(T / E))`` for cf > 0; -1 (dropless: the busiest
    expert's load) for cf == 0. Negative factors (bounded dynamic capacity) are not used here."""
    if capacity_factor == 0:
        return -1
    if capacity_factor < 0:
        raise ValueError("negative Tutel capacity factors are not benchmarked")
    return k * int(capacity_factor * ((tokens + experts - 1) // experts))


def deepspeed_capacity(tokens: int, experts: int, capacity_factor: float, min_capacity: int = 4,
                       drop_tokens: bool = True) -> int:
    """DeepSpeed-MoE's top-2 capacity (``deepspeed/moe/sharded_moe.py``: ``top2gating`` calls
    ``_capacity(gates, capacity_factor * 2, min_capacity)`` = max(ceil(T / E * 2 cf), min_capacity));
    -1 with ``drop_tokens=False`` (capacity = the busiest expert's load)."""
    if not drop_tokens:
        return -1
    return max(math.ceil(tokens / experts * capacity_factor * 2), min_capacity)


def floor_ms(tokens: int, d: int, f: int, expert_weight_bytes: int, ceilings: dict) -> float:
    """Roofline floor of one top-2 forward (as bench_moe_layer.py): max(2 GEMMs x 2 FLOPs x d x f x 2
    choices per token / matmul rate, expert weight bytes / copy rate), in ms."""
    flops = 2 * 2 * d * f * 2 * tokens
    return 1000 * max(flops / (ceilings["bf16_matmul_tflops"] * 1e12),
                      expert_weight_bytes / (ceilings["copy_GBps_read_plus_write"] * 1e9))


# ---------------------------------------------------------------- the reference layer and inputs
def reference_layer(E: int, d: int, f: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Our MoE layer (top-2, ReLU, fp32 gate), built on the meta device and filled on ``device`` from
    ``seed`` (fast at 128x2048x8192, identical in every process): weights U(-1/sqrt(fan_in), +),
    expert biases zero. Returns the layer in eval mode, weights in ``dtype``."""
    from fairseq_moe_infer.moe import MoELayer

    with torch.device("meta"):
        layer = MoELayer(d, f, E, k=2, use_fp32_gate=True, gating="dynamic")
    layer = layer.to_empty(device=device).to(dtype).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                bound = 1 / math.sqrt(p.shape[-1])
                p.copy_(torch.rand(p.shape, generator=g, device=device, dtype=torch.float32).mul_(2 * bound).sub_(bound))
    reset_moe_counters(layer)  # non-persistent buffers: to_empty left them uninitialised
    return layer


def make_inputs(T: int, d: int, device, dtype, seed: int, n: int = 3):
    """``n`` fresh random [T, d] inputs (standard normal), the same in every process for this seed."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(T, d, generator=g, device=device, dtype=torch.float32).to(dtype) for _ in range(n)]


# ---------------------------------------------------------------- implementations
class Impl:
    """One MoE implementation under test, holding the reference layer's weights (shared or copied).

    ``__call__(x [T, d]) -> [T, d]``; :meth:`dropped` gives the top-k choices its last call dropped
    (None where it cannot be known)."""

    def __init__(self, name: str, ref):
        self.name, self.ref = name, ref
        self.E, self.d, self.f = ref.num_experts, ref.experts.model_dim, ref.experts.ffn_dim

    def prepare(self) -> None:
        """Called before each measurement (a shared layer is switched to this variant)."""

    def dropped(self, T: int):
        return 0


class Ours(Impl):
    def __init__(self, name, ref):
        super().__init__(name, ref)
        self.gating, self.fraction = ("dynamic", 0.25) if "dynamic" in name else ("static", float(name.rsplit("-", 1)[1]))

    def prepare(self):
        self.ref.set_gating(self.gating, self.fraction)

    def __call__(self, x):
        return self.ref(x)

    def dropped(self, T):
        return int(self.ref.last_stats.dropped)


class TorchLoop(Impl):
    """Plain PyTorch: softmax gate in float32 (or x's dtype if wider), top-2 renormalised, then per
    expert with tokens a gather, two ``F.linear`` and an ``index_add_`` of the weighted output (the
    Hugging Face Mixtral block's pattern)."""

    def __call__(self, x):
        r, ex = self.ref, self.ref.experts
        gate_dtype = torch.promote_types(x.dtype, torch.float32)
        probs = F.softmax(F.linear(x.to(gate_dtype), r.gate.wg.weight.to(gate_dtype)), dim=-1)
        w, idx = probs.topk(2, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, self.E).permute(2, 1, 0)  # [E, k, T]
        for e in torch.nonzero(mask.sum((1, 2)) > 0).flatten().tolist():
            which, tok = torch.where(mask[e])
            h = F.relu(F.linear(x[tok], ex.fc1_weight[e], ex.fc1_bias[e]))
            out.index_add_(0, tok, F.linear(h, ex.fc2_weight[e], ex.fc2_bias[e]) * w[tok, which, None])
        return out


class Tutel(Impl):
    def __init__(self, name, ref):
        super().__init__(name, ref)
        from tutel import moe as tutel_moe

        self.cf = 1.0 if name.endswith("cf1.0") else 0.0
        dev = ref.gate.wg.weight.device
        with torch.device(dev):
            self.layer = tutel_moe.moe_layer(
                gate_type={"type": "top", "k": 2, "fp32_gate": True, "capacity_factor": self.cf},
                model_dim=self.d,
                experts={"type": "ffn", "count_per_node": self.E, "hidden_size_per_expert": self.f,
                         "activation_fn": F.relu})
        self.layer.eval().experts.to(ref.experts.fc1_weight.dtype)
        ex, src = self.layer.experts, ref.experts
        with torch.no_grad():
            self.layer.gates[0].wg.weight.copy_(ref.gate.wg.weight)
            ex.batched_fc1_w.copy_(src.fc1_weight)
            ex.batched_fc1_bias.copy_(src.fc1_bias)
            ex.batched_fc2_w.copy_(src.fc2_weight.transpose(1, 2))
            ex.batched_fc2_bias.copy_(src.fc2_bias)

    def __call__(self, x):
        return self.layer(x)

    def dropped(self, T):  # dispatch_count: [E] choices per expert before capacity (extract_critical's locations2)
        return dropped_choices(self.layer.dispatch_count.tolist(), tutel_capacity(T, self.E, 2, self.cf))


class MegaBlocks(Impl):
    def __init__(self, name, ref):
        super().__init__(name, ref)
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE

        dev = ref.gate.wg.weight.device
        args = Arguments(hidden_size=self.d, ffn_hidden_size=self.f, moe_num_experts=self.E, moe_top_k=2,
                         moe_normalize_expert_weights=1, activation_fn=F.relu, mlp_type="mlp", mlp_impl="grouped",
                         bias=False, return_bias=False, fp16=False, bf16=ref.experts.fc1_weight.dtype == torch.bfloat16,
                         device=dev)
        self.layer = dMoE(args).eval()
        src = ref.experts
        with torch.no_grad():
            self.layer.router.layer.weight.copy_(ref.gate.wg.weight)
            self.layer.experts.mlp.w1.copy_(src.fc1_weight.reshape(-1, self.d))
            self.layer.experts.mlp.w2.copy_(src.fc2_weight.transpose(1, 2).reshape(-1, self.d))

    def __call__(self, x):
        return self.layer(x)


class DeepSpeed(Impl):
    def __init__(self, name, ref):
        super().__init__(name, ref)
        from deepspeed.moe.layer import MoE

        self.drop = name.endswith("cf1.0")
        dev, dtype = ref.gate.wg.weight.device, ref.experts.fc1_weight.dtype
        with torch.device(dev):
            expert = torch.nn.Sequential(torch.nn.Linear(self.d, self.f), torch.nn.ReLU(), torch.nn.Linear(self.f, self.d))
            self.layer = MoE(hidden_size=self.d, expert=expert, num_experts=self.E, ep_size=1, k=2, capacity_factor=1.0,
                             eval_capacity_factor=1.0, min_capacity=4, drop_tokens=self.drop,
                             top2_2nd_expert_sampling=False)
        self.layer.eval().deepspeed_moe.experts.to(dtype)  # the gate stays float32, as DeepSpeed computes it
        src = ref.experts
        with torch.no_grad():
            self.layer.deepspeed_moe.gate.wg.weight.copy_(ref.gate.wg.weight)
            for e, m in enumerate(self.layer.deepspeed_moe.experts.deepspeed_experts):
                m[0].weight.copy_(src.fc1_weight[e])
                m[0].bias.copy_(src.fc1_bias[e])
                m[2].weight.copy_(src.fc2_weight[e])
                m[2].bias.copy_(src.fc2_bias[e])
        self.counts = None

    def __call__(self, x):
        y, _, self.counts = self.layer(x)
        return y

    def dropped(self, T):  # exp_counts: [E] top-2 choices per expert before capacity
        return dropped_choices(self.counts.tolist(), deepspeed_capacity(T, self.E, 1.0, 4, self.drop))


BUILDERS = {"ours": Ours, "loop": TorchLoop, "tutel": Tutel, "megablocks": MegaBlocks, "deepspeed": DeepSpeed}
IMPORTS = {"tutel": "tutel.moe", "megablocks": "megablocks.layers.dmoe", "deepspeed": "deepspeed.moe.layer"}


def error_text(e: BaseException) -> str:
    """The exception as ``Type: message`` (first 600 characters), the way a user sees it."""
    return f"{type(e).__name__}: {e}"[:600]


# ---------------------------------------------------------------- one worker: one group of implementations
def measure(impl, name, inputs, ref_out, device, budget_s, T, E, fraction_static):
    """One row: time, peak activation memory, dropped choices and difference to the reference."""
    row = {}
    impl.prepare()
    if name.startswith("ours-static") and device.type == "cuda":
        from benchmarks.bench_moe_layer import static_oom_predicted

        if static_oom_predicted(T, E, fraction_static, 1):
            return {"oom": True, "oom_predicted": True}
    if name == "ours-dynamic-graph" and device.type != "cuda":
        return {"skipped": "CUDA graphs need a GPU"}
    if device.type == "cuda":
        free_memory()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if name == "ours-dynamic-graph":
        from benchmarks.bench_moe_layer import graphed

        forward = graphed(impl.ref, inputs[0])
    else:
        forward = impl
    out = forward(inputs[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
        row["peak_activation_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    dropped = impl.dropped(T)
    if dropped is not None:
        row["dropped_choices"] = dropped
        row["dropped_pct"] = round(100 * dropped / (2 * T), 3)
    diff = (out.float() - ref_out).abs()
    row["max_abs_diff"] = float(diff.max())
    differs = diff.amax(-1) > DIFF_TOKEN_FRACTION * ref_out.abs().max()
    row["tokens_differing_pct"] = round(100 * float(differs.float().mean()), 3)
    out = None
    if device.type == "cuda":
        row.update(time_cuda(lambda i: forward(inputs[i % len(inputs)]), warmup=2, repeat=10, budget_s=budget_s))
    else:
        k = [0]

        def step():
            forward(inputs[k[0] % len(inputs)])
            k[0] += 1

        row["median_ms"] = 1000 * median_time_s(step, device, warmup=1, repeat=3)
    forward = None
    return row


def worker(a) -> None:
    """Run the implementations of group ``a.worker`` over all shapes and token counts; one JSON line per
    row to ``a.rows_out`` (written as measured, so a crash keeps the earlier rows)."""
    group = a.worker
    if a.device == "cpu":
        torch.set_num_threads(1)  # a toy-size check: more threads only contend on a shared machine
    names = [n for n in GROUPS[group] if n in a.impls]
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    deadline = time.time() + 60 * a.max_minutes
    out = open(a.rows_out, "a")

    def emit(row):
        out.write(json.dumps(row) + "\n")
        out.flush()
        log_row(row)

    if group in IMPORTS:
        try:
            __import__(IMPORTS[group])
        except Exception as e:  # ImportError, or anything an import of a half-built peer raises
            for n in names:
                emit({"impl": n, "unavailable": error_text(e)})
            return
    ceilings = json.loads(a.ceilings) if a.ceilings else None
    for shape in a.shapes:
        E, d, f = (int(v) for v in shape.split("x"))
        ref = reference_layer(E, d, f, device, dtype, seed=a.seed)
        weight_bytes = sum(p.numel() * p.element_size() for p in ref.experts.parameters())
        impls, errors = {}, {}
        for n in names:
            try:
                impls[n] = BUILDERS[group](n, ref)
            except Exception as e:
                errors[n] = error_text(e)
                traceback.print_exc()
        with torch.no_grad():
            for T in a.tokens:
                key = {"E": E, "d": d, "f": f, "tokens": T}
                if ceilings:
                    key["floor_ms"] = round(floor_ms(T, d, f, weight_bytes, ceilings), 4)
                inputs = make_inputs(T, d, device, dtype, seed=a.seed * 1000003 + T)
                ref.set_gating("dynamic")
                ref_out = ref(inputs[0]).float()
                for n in names:
                    row = {"impl": n, **key}
                    if n in errors:
                        row["error"] = errors[n]
                    elif time.time() > deadline:
                        row["skipped"] = "time budget"
                    else:
                        fraction = float(n.rsplit("-", 1)[1]) if n.startswith("ours-static") else 0.0
                        try:
                            row.update(measure(impls[n], n, inputs, ref_out, device, a.budget_s, T, E, fraction))
                        except Exception as e:
                            if is_oom(e):
                                row["oom"] = True
                            else:
                                row["error"] = error_text(e)
                                traceback.print_exc()
                        if device.type == "cuda":
                            free_memory()
                    emit(row)
                inputs = ref_out = None
        impls = ref = None
        if device.type == "cuda":
            free_memory()


# ---------------------------------------------------------------- the parent: workers, merge, table, plot
def run_workers(a, log_dir: str) -> tuple:
    """Start one worker per group (in ``GROUPS`` order), sharing the time left by implementation count.
    Returns (rows, worker status per group)."""
    groups = [g for g in GROUPS if any(n in a.impls for n in GROUPS[g])]
    deadline = time.time() + 60 * a.max_minutes
    rows, status = [], {}
    for i, g in enumerate(groups):
        n_here = sum(n in a.impls for n in GROUPS[g])
        n_left = sum(n in a.impls for h in groups[i:] for n in GROUPS[h])
        minutes = max((deadline - time.time()) / 60 * n_here / n_left, 0.05)
        rows_file = os.path.join(log_dir, f"rows_{g}.jsonl")
        log_file = os.path.join(log_dir, f"worker_{g}.log")
        open(rows_file, "w").close()
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", g, "--rows-out", rows_file, "--impls", *a.impls,
               "--shapes", *a.shapes, "--tokens", *map(str, a.tokens), "--device", a.device, "--dtype", a.dtype,
               "--budget-s", str(a.budget_s), "--max-minutes", f"{minutes:.3f}", "--seed", str(a.seed),
               "--ceilings", a.ceilings or "", "--out", a.out]
        t0 = time.time()
        print(f"== worker {g} ({minutes:.2f} min)", file=sys.stderr, flush=True)
        interrupted = False
        with open(log_file, "w") as log:
            try:  # a hung worker is stopped: 1.5x its share plus start-up and weight building
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=90 * minutes + 120).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            except KeyboardInterrupt:  # the caller's time box (SIGINT): keep what was measured, skip the rest
                rc, interrupted = "interrupted", True
        got = [json.loads(line) for line in open(rows_file) if line.strip()]
        status[g] = {"returncode": rc, "seconds": round(time.time() - t0, 1), "rows": len(got)}
        if rc != 0:
            tail = open(log_file, errors="replace").read().strip().splitlines()[-15:]
            status[g]["log_tail"] = tail
            print("\n".join(tail), file=sys.stderr)
            done = {(r["impl"], r.get("E"), r.get("d"), r.get("f"), r.get("tokens")) for r in got}
            crash = f"worker exited with status {rc} before this point: " + (tail[-1] if tail else "")
            for shape in a.shapes:
                E, d, f = (int(v) for v in shape.split("x"))
                for T in a.tokens:
                    for n in GROUPS[g]:
                        if n in a.impls and (n, E, d, f, T) not in done and not any(
                                r["impl"] == n and "unavailable" in r for r in got):
                            got.append({"impl": n, "E": E, "d": d, "f": f, "tokens": T, "error": crash[:600]})
        rows += got
        if interrupted:
            status.update({h: {"returncode": "not started (interrupted)"} for h in groups[i + 1:]})
            break
    return rows, status


def add_ratios(rows) -> None:
    """``x_ours_dynamic`` (median time / ours-dynamic's at the same point) and ``x_floor`` on every timed row."""
    ref = {(r["E"], r["d"], r["f"], r["tokens"]): r["median_ms"] for r in rows
           if r["impl"] == REFERENCE and "median_ms" in r}
    for r in rows:
        if "median_ms" not in r:
            continue
        key = (r["E"], r["d"], r["f"], r["tokens"])
        if key in ref:
            r["x_ours_dynamic"] = round(r["median_ms"] / ref[key], 3)
        if r.get("floor_ms"):
            r["x_floor"] = round(r["median_ms"] / r["floor_ms"], 3)
        r["tokens_per_s"] = round(r["tokens"] / (r["median_ms"] / 1000))


def summarize_peers(rows) -> dict:
    """Per implementation: available or the exact import/build error, and the first run error if any."""
    out = {}
    for n in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == n]
        un = next((r["unavailable"] for r in mine if "unavailable" in r), None)
        err = next((r["error"] for r in mine if "error" in r), None)
        out[n] = {"available": un is None, "measured_points": sum("median_ms" in r for r in mine)}
        if un:
            out[n]["unavailable"] = un
        if err:
            out[n]["first_error"] = err
    return out


def print_table(rows) -> None:
    print(f"{'shape':>15} {'T':>7} {'impl':>19} {'ms':>10} {'x ours-dyn':>10} {'x floor':>8} {'act MiB':>9} "
          f"{'drop%':>7} {'max|diff|':>10} {'tok diff%':>9}")
    for r in rows:
        if "unavailable" in r:
            continue
        shape = f"{r['E']}x{r['d']}x{r['f']}"
        ms = ("OOM" if r.get("oom") else "error" if "error" in r else r["skipped"] if "skipped" in r
              else f"{r['median_ms']:.3f}")
        print(f"{shape:>15} {r['tokens']:>7} {r['impl']:>19} {ms:>10} {r.get('x_ours_dynamic', ''):>10} "
              f"{r.get('x_floor', ''):>8} {r.get('peak_activation_MiB', ''):>9} {r.get('dropped_pct', ''):>7} "
              f"{'' if 'max_abs_diff' not in r else format(r['max_abs_diff'], '.3g'):>10} "
              f"{r.get('tokens_differing_pct', ''):>9}")
    for r in rows:
        if "unavailable" in r:
            print(f"{r['impl']}: unavailable: {r['unavailable']}")


def plot(rows, path: str) -> None:
    """Time per forward against tokens, one panel per shape, one line per implementation, floor dashed."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from benchmarks.plot_results import fmt_tokens

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import set the root logger to DEBUG

    shapes = list(dict.fromkeys((r["E"], r["d"], r["f"]) for r in rows if "E" in r))
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 4.2), squeeze=False)
    for ax, (E, d, f) in zip(axes[0], shapes):
        mine = [r for r in rows if (r.get("E"), r.get("d"), r.get("f")) == (E, d, f)]
        for n in dict.fromkeys(r["impl"] for r in mine):
            pts = sorted((r["tokens"], r["median_ms"]) for r in mine if r["impl"] == n and "median_ms" in r)
            if pts:  # dashed: fixed capacity (may drop tokens)
                ax.plot(*zip(*pts), marker="o", ms=3, label=n, lw=2.2 if n.startswith("ours") else 1.2,
                        ls="--" if n in CAPACITY_LIMITED else "-")
        floor = sorted({(r["tokens"], r["floor_ms"]) for r in mine if r.get("floor_ms")})
        if floor:
            ax.plot(*zip(*floor), "k--", lw=1, label="roofline floor")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(fmt_tokens))
        ax.set(yscale="log", xlabel="tokens", ylabel="ms per forward", title=f"E={E}, d={d}, f={f}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--shapes", nargs="+", default=None, help="E x d x f (default: 64x1024x4096 128x1024x4096 128x2048x8192)")
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="tokens per forward (default 512 4096 32768 131072)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--toy", action="store_true", help="small shapes and token counts (a CPU check of the code)")
    p.add_argument("--budget-s", type=float, default=1.0, help="timed seconds per measurement at most")
    p.add_argument("--max-minutes", type=float, default=6.0, help="all workers together; later points are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="worker logs and row files (default: a temporary folder)")
    p.add_argument("--out", required=True, help="JSON results path (the PNG goes beside it)")
    p.add_argument("--worker", choices=list(GROUPS), help=argparse.SUPPRESS)
    p.add_argument("--rows-out", help=argparse.SUPPRESS)
    p.add_argument("--ceilings", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.shapes = a.shapes or (["8x32x64", "16x64x128"] if a.toy else ["64x1024x4096", "128x1024x4096", "128x2048x8192"])
    a.tokens = a.tokens or ([16, 256] if a.toy else [512, 4096, 32768, 131072])
    if a.worker:
        return worker(a)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible; use --device cpu --toy for a CPU check")
    ceilings = measure_ceilings() if a.device == "cuda" else None
    a.ceilings = json.dumps(ceilings) if ceilings else ""
    if a.device == "cuda":
        free_memory()  # the ceiling measurement's buffers, before the workers take the GPU
    log_dir = a.log_dir or tempfile.mkdtemp(prefix="bench_peers_")
    os.makedirs(log_dir, exist_ok=True)
    rows, status = run_workers(a, log_dir)
    add_ratios(rows)
    write_json(a.out, {"benchmark": "moe_layer_peers", "run": run_info(argv), "ceilings": ceilings,
                       "dtype": a.dtype, "top_k": 2, "activation": "relu", "expert_biases": "zero (MegaBlocks has none)",
                       "peers": summarize_peers(rows), "workers": status, "rows": rows})
    print_table(rows)
    plot(rows, os.path.splitext(a.out)[0] + ".png")


if __name__ == "__main__":
    main()
