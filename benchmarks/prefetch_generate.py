#!/usr/bin/env python3
"""Miss handling of expert buffering measured through the stock ``fairseq-generate`` (issue #11 item 5).

Runs ``fairseq-generate`` with the bundled MT model (``assets/``) on a bundled test set, first
with all experts resident (recording the routing trace), then with ``--moe-expert-buffer-size K``
and each ``--moe-prefetch`` / ``--moe-cpu-experts`` configuration given, and reports per run: the
hypotheses compared with the all-resident run (must be identical), the run's ``moe_summary``
buffer totals (lookups, hits, misses, experts copied and their bytes, prefetches issued, prefetch
hits, wasted prefetch bytes, misses saved against the same policy without prefetching, CPU-run
experts and tokens, copy bytes avoided), the tool's wall time and the MoE wall time. The ``gate``
predictor needs hidden states, so only such a run measures it; ``none`` and ``previous-step`` are
also replayed from the recorded trace by ``scripts/simulate_buffering.py``'s functions, as a
cross-check of the store against the simulator (``simulated`` in each row).

On a CPU the copies are memcpys and the times say little; on a GPU (``--device cuda``) the wall
times include the copies' latency. The bundled experts are small (0.5 MiB in fp32), so for copy
costs of paper-sized experts use ``bench_end_to_end.py --workloads mt-replay`` on the H200.

Example (the committed CPU results):
    python benchmarks/prefetch_generate.py --out benchmarks/results/prefetch_generate_cpu.json
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from benchmarks.common import run_info, write_json  # noqa: E402

_SUMMARY = re.compile(r"moe_summary (\{.*\})")


def fairseq_tool(name: str) -> list:
    script = os.path.join(os.path.dirname(sys.executable), f"fairseq-{name}")
    return [script] if os.path.exists(script) else [sys.executable, "-m", f"fairseq_cli.{name.replace('-', '_')}"]


def generate(a, extra: list) -> dict:
    """One fairseq-generate run: hypotheses (sorted H-/D- lines), moe_summary, wall seconds."""
    args = [os.path.join(REPO, a.data), "--user-dir", os.path.join(REPO, "fairseq_moe_infer"), "--task", "moe_translation",
            "--path", os.path.join(REPO, a.checkpoint), "--source-lang", "src", "--target-lang", "tgt",
            "--gen-subset", a.gen_subset, "--beam", str(a.beam), "--max-tokens", str(a.max_tokens),
            "--required-batch-size-multiple", "1", "--post-process", "sentencepiece", "--moe-gating", "dynamic"]
    if a.num_shards > 1:
        args += ["--num-shards", str(a.num_shards), "--shard-id", str(a.shard_id)]
    if a.device == "cpu":
        args.append("--cpu")
    elif a.fp16:
        args.append("--fp16")
    t0 = time.perf_counter()
    proc = subprocess.run(fairseq_tool("generate") + args + [str(x) for x in extra], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"prefetch_generate.py: error: fairseq-generate failed ({' '.join(map(str, extra))}):\n{text[-3000:]}")
    hyps = sorted(line for line in proc.stdout.splitlines() if line[:2] in ("H-", "D-"))
    return {"hyps": hyps, "summary": json.loads(_SUMMARY.search(text).group(1)), "wall_s": round(wall, 2)}


def simulated(trace_path: str, K: int, policy: str, predictor: str) -> dict:
    """Buffer counts of the store replayed from the trace (all layers), by scripts/simulate_buffering.py."""
    import simulate_buffering as sim

    from fairseq_moe_infer.trace import read_trace

    t = read_trace(trace_path)
    total = {}
    for name, (lookups, _) in sim.layer_lookups(t).items():
        r = sim.simulate_prefetch(lookups, t.expert_counts(name), K, policy, t.num_experts, predictor)
        for k, v in r.items():
            total[k] = total.get(k, 0) + v
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="assets/mt", help="fairseq data folder (relative to the repository)")
    p.add_argument("--checkpoint", default="assets/checkpoints/mt_moe/checkpoint.pt")
    p.add_argument("--gen-subset", default="test", help="test = Multi30k test_2016_flickr en-de (1,000 sentences)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--num-shards", type=int, default=1, help="generate shard --shard-id of the set split in this many")
    p.add_argument("--shard-id", type=int, default=0)
    p.add_argument("--slots", type=int, default=4, help="--moe-expert-buffer-size K")
    p.add_argument("--policy", default="lifo", help="--moe-buffer-policy")
    p.add_argument("--configs", nargs="+", default=["none:off", "previous-step:off", "gate:off", "none:auto"],
                   help="PREFETCH:CPU_EXPERTS pairs (--moe-prefetch, --moe-cpu-experts) to run with buffering")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--fp16", action="store_true", help="cuda: fairseq-generate --fp16")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (the median wall time is reported)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    info = run_info(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.npz")
        base = generate(a, ["--moe-record-trace", trace])
        walls = [base["wall_s"]] + [generate(a, [])["wall_s"] for _ in range(a.repeat - 1)]
        rows.append({"config": "all resident", "wall_s": sorted(walls)[len(walls) // 2],
                     "moe_wall_s": base["summary"]["wall_s"], "sentences": len([h for h in base["hyps"] if h[:2] == "H-"]),
                     "tokens": base["summary"]["tokens"]})
        print(rows[-1], file=sys.stderr, flush=True)
        for config in a.configs:
            prefetch, cpu = config.split(":")
            flags = ["--moe-expert-buffer-size", a.slots, "--moe-buffer-policy", a.policy, "--moe-prefetch", prefetch,
                     "--moe-cpu-experts", cpu]
            runs = [generate(a, flags) for _ in range(a.repeat)]
            r = runs[0]
            buf = r["summary"]["buffer"]
            per_expert = next(iter(r["summary"]["layers"].values()))["buffer"]["device_bytes_buffered"] // a.slots
            row = {"config": f"K={a.slots} {a.policy} prefetch={prefetch} cpu-experts={cpu}", "flags": " ".join(map(str, flags)),
                   "same_hypotheses_as_all_resident": all(x["hyps"] == base["hyps"] for x in runs),
                   "wall_s": sorted(x["wall_s"] for x in runs)[len(runs) // 2], "moe_wall_s": r["summary"]["wall_s"],
                   "miss_rate": round(buf["misses"] / buf["lookups"], 4) if buf["lookups"] else None,
                   "experts_copied": buf["bytes_copied_h2d"] // per_expert,
                   "buffer": buf,
                   "cpu_cost_rates": {n: v["buffer"].get("cpu_cost_rates") for n, v in r["summary"]["layers"].items()}
                   if cpu == "auto" else None}
            if cpu == "off" and prefetch in ("none", "previous-step"):
                row["simulated"] = simulated(trace, a.slots, a.policy, prefetch)
            rows.append(row)
            print({k: v for k, v in row.items() if k != "buffer"}, file=sys.stderr, flush=True)
    write_json(a.out, {"benchmark": "prefetch_generate", "run": info,
                       "setup": {"data": a.data, "gen_subset": a.gen_subset, "num_shards": a.num_shards,
                                 "shard_id": a.shard_id, "beam": a.beam, "max_tokens": a.max_tokens,
                                 "slots": a.slots, "policy": a.policy, "device": a.device, "fp16": a.fp16},
                       "rows": rows})


if __name__ == "__main__":
    main()
