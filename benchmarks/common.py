"""Shared benchmark utilities: timing (CUDA events, warm-up, median), ceilings, JSON records.

Method (the device documentation's METHOD.md): time with CUDA
events after warm-up, take the median of several repeats, draw fresh random
inputs (rotating among several sets so the L2 cache does not serve repeats),
and report each time against a ceiling measured in the same run.
"""

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def init_distributed() -> tuple:
    """(rank, world) under torchrun (NCCL, one GPU per process); (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def time_cuda(fn: Callable[[int], object], warmup: int = 2, repeat: int = 5, budget_s: float = 5.0) -> dict:
    """Median milliseconds of ``fn(i)`` (i = repeat index, to rotate inputs) timed with CUDA events.

    Stops repeating once ``budget_s`` seconds of timed work accumulate (at least 2 repeats).
    Under torch.distributed the ranks synchronise before each repeat.
    """
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times: List[float] = []
    world = dist.get_world_size() if dist.is_initialized() else 1
    for i in range(repeat):
        barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(warmup + i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        # all ranks stop together: a rank running one more repeat would wait in its collectives
        if any_rank(sum(times) / 1000 > budget_s and len(times) >= 2, world):
            break
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": len(times)}


def median_time_s(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeat: int = 3,
                  slowest_rank: bool = False) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs: CUDA events on a GPU,
    ``time.perf_counter`` on the CPU (toy-size checks of the benchmarks).

    Each run starts with the device idle and, under torch.distributed, all ranks at a barrier; with
    ``slowest_rank`` a run's time is the largest over the ranks (an expert-parallel step ends when
    its slowest rank ends). :func:`time_cuda` is the GPU-only variant with a time budget."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        if slowest_rank and dist.is_initialized():
            reduced = torch.tensor([t], dtype=torch.float64, device="cuda" if device.type == "cuda" else "cpu")
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
            t = float(reduced)
        times.append(t)
    return statistics.median(times)


def measure_ceilings() -> dict:
    """Measured bf16 matmul rate (8192^3, random data) and device-to-device copy rate."""
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_cuda(lambda i: a @ b, warmup=3, repeat=10)["median_ms"]
    tflops = 2 * n**3 / (t / 1000) / 1e12
    src = torch.randn(2 * 1024**3 // 4, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    t = time_cuda(lambda i: dst.copy_(src), warmup=3, repeat=10)["median_ms"]
    copy_gbs = 2 * src.numel() * 4 / (t / 1000) / 1e9  # bytes read + written
    return {"bf16_matmul_tflops": round(tflops, 1), "copy_GBps_read_plus_write": round(copy_gbs, 1)}


def run_info(argv: Optional[List[str]] = None) -> dict:
    """Command, git commit, device and library versions for a results file."""
    commit = os.environ.get("GIT_COMMIT", "")  # the device copy's .git can lag the tree: the caller says
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = "unknown"
    return {
        "command": " ".join(["python"] + (argv if argv is not None else sys.argv)),
        "git_commit": commit,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": int(os.environ.get("WORLD_SIZE", "1")),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


@contextlib.contextmanager
def oom_marks(row: dict):
    """Runs the block; an out-of-memory error (``torch.OutOfMemoryError`` or an allocator's "out of
    memory" RuntimeError) sets ``row["oom"] = True`` and is swallowed, so a sweep records the point and
    goes on. Any other error propagates."""
    try:
        yield row
    except RuntimeError as e:
        if not is_oom(e):
            raise
        row["oom"] = True


def any_rank(flag: bool, world: int) -> bool:
    """True if ``flag`` is true on any rank, so that all ranks take the same branch
    (a rank leaving out a collective would hang the others)."""
    if world == 1:
        return flag
    t = torch.tensor([int(flag)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def rows_per_gpu(counts: torch.Tensor, world: int, calls: int = 1) -> dict:
    """Routed top-k rows each GPU's experts computed per call, max and mean over GPUs.

    Args:
        counts: [E] int64 rows this rank's tokens sent to each global expert (experts
            sharded in order over the ``world`` GPUs); all-reduced here when world > 1.
        calls: forwards the counts were summed over.
    """
    counts = counts.clone()
    if world > 1:
        dist.all_reduce(counts)
    per_gpu = counts.view(world, -1).sum(1).double() / calls
    return {"rows_per_gpu_max": round(float(per_gpu.max()), 1), "rows_per_gpu_mean": round(float(per_gpu.mean()), 1),
            "rows_per_gpu_max_over_mean": round(float(per_gpu.max() / per_gpu.mean()), 3) if per_gpu.sum() else None}


def reset_moe_counters(model) -> None:
    """Zero the evaluation counters of every MoE layer of ``model`` (read by :func:`moe_rows_per_gpu`)."""
    from fairseq_moe_infer.moe import moe_layers

    for m in moe_layers(model):
        m.reset_eval_totals()
        m.placement.reset_buffers()  # index buffers of the placement map: to_empty left them uninitialised


def moe_rows_per_gpu(model, world: int, calls: int = 1) -> dict:
    """:func:`rows_per_gpu` summed over all MoE layers of ``model``, from their evaluation
    counters (reset before the ``calls`` calls). Static gating computes its padding too
    (E·C rows per layer), not counted here."""
    from fairseq_moe_infer.moe import moe_layers

    counts = [m.eval_expert_counts() for m in moe_layers(model)]
    return rows_per_gpu(sum(counts), world, calls) if counts else {}


def log_row(row: dict) -> None:
    """One measurement as ``key=value`` pairs on stderr (progress while a benchmark runs)."""
    print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)


def exit_after_oom_under_expert_parallelism(save: Callable[[], None]) -> None:
    """After an out-of-memory error with several ranks: the ranks may sit in different
    collectives, so nothing collective is safe any more. Save what was measured (rank 0
    saves) and end this process with status 75; torchrun then stops the other ranks."""
    save()
    print("out of memory under expert parallelism: stopping (results so far are saved by rank 0)",
          file=sys.stderr, flush=True)
    os._exit(75)


def free_memory() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()
