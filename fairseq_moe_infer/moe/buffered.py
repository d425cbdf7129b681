"""The buffered expert store: all experts of a layer in (pinned) CPU memory, K of them in device slots.

Expert buffering, Huang et al. 2024 ("Toward Efficient Inference for Mixture of Experts"),
Sec. 5: keep the hot experts of each MoE layer in GPU memory and the others in CPU memory.
An :class:`~fairseq_moe_infer.moe.experts.Experts` module with a buffer
(:meth:`Experts.set_buffer`) offers the dispatchers the same ``forward_grouped`` /
``forward_padded`` calls; inside, per call:

1. the experts that received rows are looked up in the layer's
   :class:`~fairseq_moe_infer.moe.eviction.SlotCache` (one host sync for the counts);
2. misses are copied from pinned CPU memory into slots (evicting by the policy) on a side CUDA
   stream with ``non_blocking`` copies, while the resident experts (hits) already compute on
   the current stream; the missed experts compute once their copies have arrived;
3. a call needing more than K experts runs in waves of at most K.

Beyond the paper (issue #11 item 5), two ways to handle misses:

* **prefetching** (``--moe-prefetch``): a predictor (:mod:`fairseq_moe_infer.moe.prefetch`)
  calls :meth:`ExpertBuffer.prefetch` with the experts it expects the next call of this layer to
  use; they enter slots through the layer's eviction policy
  (:meth:`~fairseq_moe_infer.moe.eviction.SlotCache.prefetch`) and their copies start at once on
  the side stream (after this layer's last compute, which may still read the slots); the next call
  waits for a prefetched slot's copy only where it uses it. A shadow cache with the same policy
  and no prefetching sees the same lookups, so the statistics give the misses prefetching saved;
* **CPU experts** (``--moe-cpu-experts auto``): a missed expert whose few token rows are cheaper
  to run on the CPU than to copy the expert in (:class:`~fairseq_moe_infer.moe.cpu_experts.CPUExpertCostModel`,
  from the copy and compute rates this store measures) is computed from its host copy; its rows go
  to the host and its outputs come back, and it takes no slot.

Each expert computes exactly the function (and, on CPU, the same floating-point operations on
the same rows) as the all-resident store, so outputs do not change. Without CUDA the "device"
is CPU memory and the copies are plain copies: the logic is the same and is tested on CPU.

The full stacks are moved to CPU at the first evaluation forward (after fairseq has loaded the
checkpoint and moved / cast the model), and the device parameters are released then. Buffering
is for inference only: a training forward with a buffer raises :class:`MoEConfigError`.

Statistics (:meth:`ExpertBuffer.stats`): lookups, hits, misses, hit rate, bytes copied host to
device, copy time and the part of it that overlapped the hits' compute (CUDA events), and the
device bytes held by the slots against all-resident experts; with prefetching, prefetches
issued, prefetch hits, wasted prefetch bytes and the misses saved against no prefetching; with
CPU experts, the experts and tokens run on the CPU, the copy bytes that avoided and the rates used.
"""

import logging
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_experts import CPUExpertCostModel
from .eviction import SlotCache, Wave, build_policy
from .gate import MoEConfigError
from .options import CPU_EXPERT_MODES

_COPY_STREAMS: Dict[torch.device, "torch.cuda.Stream"] = {}
logger = logging.getLogger("fairseq_moe_infer")


def _copy_stream(device: torch.device):
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device=device)
    return _COPY_STREAMS[device]


def _event():
    return torch.cuda.Event(enable_timing=True)


class ExpertBuffer:
    """K device slots caching the experts of one :class:`Experts` module.

    Args:
        num_experts: E_local, the experts of the module.
        num_slots: K, 1 <= K <= E_local.
        policy: eviction policy name (``lifo``, ``lru``, ``fifo``, ``lfu``, ``belady``).
        future: belady only: for each call of the layer, the local experts it uses (from a trace).
        prefetch: name of the prefetch predictor feeding :meth:`prefetch` (``none``: no shadow
            cache is kept; any other name is reported and turns on the prefetch statistics).
        cpu_experts: ``off`` or ``auto`` (run cheap missed experts on the CPU, see the module docstring).
        cpu_rates: ``auto`` only: fixed rates for the cost model (keys of
            :data:`~fairseq_moe_infer.moe.cpu_experts.RATE_NAMES`); None: measured, with warm-up defaults.

    Raises:
        MoEConfigError: K out of range, an unknown policy or CPU-expert mode, or belady without ``future``.
    """

    def __init__(self, num_experts: int, num_slots: int, policy: str = "lifo",
                 future: Optional[Sequence[Sequence[int]]] = None, prefetch: str = "none",
                 cpu_experts: str = "off", cpu_rates: Optional[Dict[str, float]] = None):
        if not 1 <= num_slots <= num_experts:
            raise MoEConfigError(
                f"--moe-expert-buffer-size must be between 1 and the {num_experts} experts per rank of a layer "
                f"(0 = all experts resident), got {num_slots}")
        if policy == "belady" and future is None:
            raise MoEConfigError("--moe-buffer-policy belady replays a routing trace: give --moe-buffer-trace PATH "
                                 "(recorded with --moe-record-trace on the same data and flags)")
        if cpu_experts not in CPU_EXPERT_MODES:
            raise MoEConfigError(f"unknown --moe-cpu-experts '{cpu_experts}'; choose one of {', '.join(CPU_EXPERT_MODES)}")
        try:
            self.cache = SlotCache(num_experts, num_slots, build_policy(policy, num_experts, future))
            # the same policy without prefetching, fed the same lookups: misses prefetching saved
            self.shadow = (SlotCache(num_experts, num_slots, build_policy(policy, num_experts, future))
                           if prefetch != "none" else None)
        except ValueError as e:
            raise MoEConfigError(str(e)) from None
        self.num_experts, self.num_slots, self.policy_name = num_experts, num_slots, policy
        self.prefetch_name, self.cpu_mode, self.cpu_rates = prefetch, cpu_experts, cpu_rates
        # belady: each call's experts in the trace, to notice a trace of other data or flags (then not the optimum)
        self.future = None if future is None else [{int(e) for e in f} for f in future]
        self.trace_mismatched_calls = 0
        self.host: Optional[List[Tensor]] = None  # full [E_local, ...] stacks in (pinned) CPU memory
        self.slots: Optional[List[Tensor]] = None  # [K, ...] stacks on the device
        self.cost: Optional[CPUExpertCostModel] = None  # cpu_experts auto, set when the stacks are placed
        self.bytes_per_expert = 0
        self.bytes_copied = 0  # misses and prefetches
        self.bytes_prefetched = 0
        self.copy_s = 0.0
        self.overlap_s = 0.0
        self.cpu_runs = self.cpu_tokens = 0
        self.cpu_s = 0.0
        self.last_rows: List[int] = []  # token rows of each local expert in the last call (host values)
        self._flops_per_row = 0
        self._arriving: Dict[int, "torch.cuda.Event"] = {}  # slot -> end of its prefetch copy, not yet waited for
        self._last_compute = None  # CUDA event after this layer's last compute (the slots' last reader)
        # CUDA events not yet read: ("copy", start, end, bytes, hits-compute events or None) / ("compute", start, end, flops)
        self._pending: List[tuple] = []
        self._ref = None

    # ---- placement of the weights -------------------------------------------------
    def materialize(self, params: Sequence[torch.nn.Parameter], device: torch.device) -> None:
        """Move the module's stacked parameters to CPU (pinned when ``device`` is CUDA), allocate
        the K slots on ``device`` and release the parameters' device memory."""
        cuda = device.type == "cuda"
        self.host = []
        for p in params:
            h = p.detach().to("cpu", copy=True)
            self.host.append(h.pin_memory() if cuda else h)
        self.slots = [torch.empty((self.num_slots,) + tuple(h.shape[1:]), dtype=h.dtype, device=device)
                      for h in self.host]
        self.bytes_per_expert = sum(h[0].numel() * h.element_size() for h in self.host)
        for p in params:  # the device copy is no longer needed (the host stacks are the weights now)
            p.data = torch.empty((0,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device)
        self._placed(device)

    def adopt(self, other: "ExpertBuffer") -> None:
        """Serve from the host stacks ``other`` already holds (e.g. after the module's parameters
        were released), with this buffer's own K slots on the same device."""
        self.host = other.host
        device = other.slots[0].device
        self.slots = [torch.empty((self.num_slots,) + tuple(h.shape[1:]), dtype=h.dtype, device=device)
                      for h in self.host]
        self.bytes_per_expert = other.bytes_per_expert
        self._placed(device)

    def _placed(self, device: torch.device) -> None:
        f, d = self.host[0].shape[1:]  # fc1_weight [E, f, d]
        self._flops_per_row = 4 * d * f
        if self.cpu_mode == "auto":
            self.cost = CPUExpertCostModel(d, f, self.bytes_per_expert, self.host[0].element_size(), device.type,
                                           rates=self.cpu_rates, measure=self.cpu_rates is None)
        if device.type == "cuda":
            self._ref = _event()
            self._ref.record()

    @property
    def ready(self) -> bool:
        return self.slots is not None

    # ---- copies and computes ----------------------------------------------------------
    def _copy(self, loads, device: torch.device, after=None):
        """Copy the experts of ``loads`` [(expert, slot)] into their slots; on CUDA on the side
        stream after the current stream's work (or, with ``after``, after that event): returns
        (event when done, (start, end)); on CPU plain copies: (None, None)."""
        nbytes = self.bytes_per_expert * len(loads)
        self.bytes_copied += nbytes
        for _, s in loads:
            self._arriving.pop(s, None)  # an earlier prefetch into this slot is superseded (same stream, in order)
        if device.type != "cuda":
            t0 = time.perf_counter()
            for e, s in loads:
                for slot, host in zip(self.slots, self.host):
                    slot[s].copy_(host[e])
            dt = time.perf_counter() - t0
            self.copy_s += dt
            if self.cost is not None:
                self.cost.observe_copy(nbytes, dt)
            return None, None
        stream = _copy_stream(device)
        if after is None:
            stream.wait_stream(torch.cuda.current_stream(device))  # slots may still be read by earlier compute
        else:
            stream.wait_event(after)
        start, done = _event(), _event()
        with torch.cuda.stream(stream):
            start.record(stream)
            for e, s in loads:
                for slot, host in zip(self.slots, self.host):
                    slot[s].copy_(host[e], non_blocking=True)
            done.record(stream)
        return done, (start, done, nbytes)

    def _compute(self, compute, pairs, rows: int, device: torch.device) -> Optional[tuple]:
        """Run ``compute(pairs)``; with the cost model, time it (CUDA events or host time)."""
        if self.cost is None:
            compute(pairs)
            return None
        flops = self._flops_per_row * rows
        if device.type != "cuda":
            t0 = time.perf_counter()
            compute(pairs)
            self.cost.observe_device(flops, time.perf_counter() - t0)
            return None
        start, end = _event(), _event()
        start.record()
        compute(pairs)
        end.record()
        self._pending.append(("compute", start, end, flops))
        return start, end

    def _wait_for_prefetched(self, pairs, device: torch.device) -> None:
        for _, s in pairs:
            ev = self._arriving.pop(s, None)
            if ev is not None:
                torch.cuda.current_stream(device).wait_event(ev)

    def _run_wave(self, wave: Wave, device: torch.device, compute, rows_of) -> None:
        """Copy the wave's misses on the side stream while its hits compute, then compute the misses."""
        arrived, copy_events = self._copy(wave.loads, device) if wave.loads else (None, None)
        comp = None
        if wave.resident:
            self._wait_for_prefetched(wave.resident, device)
            if copy_events is not None:
                comp = (_event(), _event())
                comp[0].record()
            self._compute(compute, wave.resident, sum(rows_of(e) for e, _ in wave.resident), device)
            if comp is not None:
                comp[1].record()
        if wave.loads:
            if arrived is not None:
                torch.cuda.current_stream(device).wait_event(arrived)
            self._compute(compute, wave.loads, sum(rows_of(e) for e, _ in wave.loads), device)
        if copy_events is not None:
            self._pending.append(("copy",) + copy_events + (comp,))

    def _end_call(self, device: torch.device) -> None:
        if device.type != "cuda":
            return
        self._last_compute = torch.cuda.Event()
        self._last_compute.record()
        if self.cost is not None:
            self._read_events(wait=False)  # completed events only: the rates follow without a sync
        elif len(self._pending) > 256:
            self._read_events(wait=True, n=len(self._pending) // 2)

    def _read_events(self, wait: bool = True, n: Optional[int] = None) -> None:
        """Account the pending CUDA events: all of them (``wait``: may sync), the first ``n``, or
        (not ``wait``) only those already completed (no sync)."""

        def completed(rec):
            return rec[2].query() and (rec[0] != "copy" or rec[4] is None or rec[4][1].query())

        take, keep = [], []
        for i, rec in enumerate(self._pending):
            done = (n is None or i < n) if wait else completed(rec)
            (take if done else keep).append(rec)
        self._pending = keep
        for rec in take:
            rec[2].synchronize()
            a0, a1 = self._ref.elapsed_time(rec[1]), self._ref.elapsed_time(rec[2])
            if rec[0] == "compute":
                if self.cost is not None:
                    self.cost.observe_device(rec[3], (a1 - a0) / 1e3)
                continue
            _, _, _, nbytes, comp = rec
            self.copy_s += (a1 - a0) / 1e3
            if self.cost is not None:
                self.cost.observe_copy(nbytes, (a1 - a0) / 1e3)
            if comp is not None:
                comp[1].synchronize()
                b0, b1 = self._ref.elapsed_time(comp[0]), self._ref.elapsed_time(comp[1])
                self.overlap_s += max(0.0, min(a1, b1) - max(a0, b0)) / 1e3

    # ---- prefetching ----------------------------------------------------------------
    def prefetch(self, experts: Sequence[int]) -> int:
        """Start copying predicted experts into slots before the next call of this layer.

        Args:
            experts: local expert ids (0..E_local-1), most likely first; at most K are loaded
                (:meth:`~fairseq_moe_infer.moe.eviction.SlotCache.prefetch`: evictions by the policy,
                a predicted expert never evicted for another).

        Returns:
            the number of experts whose copies were issued (0 before the first call placed the stacks).
        Outputs never depend on it: a call waits for a prefetched slot's copy before using it.
        """
        if not self.ready:
            return 0
        loads = self.cache.prefetch(experts)
        if not loads:
            return 0
        device = self.slots[0].device
        done, events = self._copy(loads, device, after=self._last_compute)
        self.bytes_prefetched += self.bytes_per_expert * len(loads)
        if events is not None:
            for _, s in loads:
                self._arriving[s] = done
            self._pending.append(("copy",) + events + (None,))
        return len(loads)

    # ---- CPU experts ----------------------------------------------------------------
    def _cpu_choice(self, active: List[int], rows: List[int]) -> List[int]:
        """The experts of ``active`` (not resident) that run on the CPU this call."""
        if self.cost is None:
            return []
        return [e for e in active if e not in self.cache.slot_of and self.cost.run_on_cpu(rows[e])]

    def _cpu_run(self, fn, expert: int, x: Tensor, rows: int) -> Tensor:
        """``fn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` with ``expert``'s host weights, timed;
        ``rows`` token rows (the cost model's unit)."""
        t0 = time.perf_counter()
        y = fn(x, *[h[expert] for h in self.host])
        dt = time.perf_counter() - t0
        self.cpu_s += dt
        self.cpu_runs += 1
        self.cpu_tokens += rows
        self.cost.observe_cpu(self._flops_per_row * rows, dt)
        return y

    def _lookup(self, active: List[int]) -> List[Wave]:
        t = self.cache.t
        in_trace = self.future is not None and t < len(self.future)
        unexpected = set(active) - self.future[t] if in_trace else set(active) if self.future is not None else set()
        if unexpected:
            if not self.trace_mismatched_calls:  # once per layer
                logger.warning(
                    "--moe-buffer-trace does not match this run: call %d of a MoE layer used experts %s, which %s; "
                    "belady then evicts by another run's future and is not the offline optimum (counted as "
                    "trace_mismatched_calls in moe_summary): record the trace with the same data and flags",
                    t, sorted(unexpected), f"the trace's call {t} did not choose" if in_trace
                    else f"the trace's {len(self.future)} calls of that layer do not reach")
            self.trace_mismatched_calls += 1
        if self.shadow is not None:
            self.shadow.lookup(active)
        return self.cache.lookup(active)

    # ---- the Experts calls ------------------------------------------------------------
    def forward_grouped(self, experts, x: Tensor, counts: Tensor, expert_of_row: Tensor) -> Tensor:
        """:meth:`Experts.forward_grouped` (same arguments and result) through the slots."""
        from .experts import grouped_gemm_available

        host = counts.tolist()  # the one host sync: which experts have rows
        self.last_rows = host
        starts = [0]
        for n in host:
            starts.append(starts[-1] + n)
        active = [e for e, n in enumerate(host) if n]
        on_cpu = self._cpu_choice(active, host)
        x_cpu = None
        if on_cpu:  # their rows to the host first, before the device computes are queued behind them
            cpu_idx = torch.cat([torch.arange(starts[e], starts[e + 1]) for e in on_cpu]).to(x.device)
            x_cpu = x[cpu_idx].to("cpu")
            skip = set(on_cpu)
            active = [e for e in active if e not in skip]
        out = torch.zeros_like(x)
        w1, b1, w2, b2 = self.slots
        if grouped_gemm_available(x):
            def compute(pairs):
                pairs = sorted(pairs, key=lambda p: p[1])  # grouped GEMM groups in slot order
                slot_counts = [0] * self.num_slots
                idx, eor = [], []
                for e, s in pairs:
                    slot_counts[s] = host[e]
                    idx.append(torch.arange(starts[e], starts[e + 1]))
                    eor.append(torch.full((host[e],), s, dtype=torch.long))
                idx = torch.cat(idx).to(x.device, non_blocking=True)
                eor = torch.cat(eor).to(x.device, non_blocking=True)
                c = torch.tensor(slot_counts, dtype=torch.long).to(x.device, non_blocking=True)
                out[idx] = experts._grouped_mm(self.slots, x[idx], c, eor)
        else:
            def compute(pairs):  # the same per-expert F.linear on the same rows as the resident store
                for e, s in pairs:
                    rows = x[starts[e] : starts[e + 1]]
                    h = F.linear(rows, w1[s], b1[s])
                    out[starts[e] : starts[e + 1]] = F.linear(experts._hidden(h), w2[s], b2[s])
        for wave in self._lookup(active):
            self._run_wave(wave, x.device, compute, host.__getitem__)
        if on_cpu:  # computed on the host while the device runs the waves queued above
            def ffn(rows, fw1, fb1, fw2, fb2):  # the per-expert F.linear pair of the slots' path
                return F.linear(experts._hidden(F.linear(rows, fw1, fb1)), fw2, fb2)

            parts, at = [], 0
            for e in on_cpu:
                parts.append(self._cpu_run(ffn, e, x_cpu[at : at + host[e]], host[e]))
                at += host[e]
            out[cpu_idx] = torch.cat(parts).to(x.device)
        self._end_call(x.device)
        return out

    def forward_padded(self, experts, x: Tensor) -> Tensor:
        """:meth:`Experts.forward_padded` (same arguments and result) through the slots.

        An expert is used when any of its C capacity rows is non-zero (the static dispatcher's
        unused capacity rows are exactly zero; such an expert's output rows are not combined,
        so they are returned as zeros). A used expert computes all its C rows (as the resident
        store does), so that is the row count of its cost."""
        rows = x.ne(0).any(dim=2).sum(dim=1).tolist()  # host sync: non-zero rows per expert
        self.last_rows = rows
        C = x.shape[1]
        active = [e for e, n in enumerate(rows) if n]
        on_cpu = self._cpu_choice(active, [C if n else 0 for n in rows])
        x_cpu = x[on_cpu].to("cpu") if on_cpu else None
        if on_cpu:
            skip = set(on_cpu)
            active = [e for e in active if e not in skip]
        out = torch.zeros_like(x)
        w1, b1, w2, b2 = self.slots

        def compute(pairs):
            ids = torch.tensor([e for e, _ in pairs], device=x.device)
            slots = torch.tensor([s for _, s in pairs], device=x.device)
            h = torch.baddbmm(b1[slots][:, None, :], x[ids], w1[slots].transpose(1, 2))
            out[ids] = torch.baddbmm(b2[slots][:, None, :], experts._hidden(h), w2[slots].transpose(1, 2))

        for wave in self._lookup(active):
            self._run_wave(wave, x.device, compute, lambda e: C)
        if on_cpu:
            def ffn(xe, fw1, fb1, fw2, fb2):  # the slots' batched matmuls for a batch of one expert
                h = torch.baddbmm(fb1[None, None, :], xe, fw1[None].transpose(1, 2))
                return torch.baddbmm(fb2[None, None, :], experts._hidden(h), fw2[None].transpose(1, 2))

            parts = [self._cpu_run(ffn, e, x_cpu[i : i + 1], C) for i, e in enumerate(on_cpu)]
            out[torch.tensor(on_cpu, device=x.device)] = torch.cat(parts).to(x.device)
        self._end_call(x.device)
        return out

    # ---- statistics ---------------------------------------------------------------------
    def stats(self) -> dict:
        """Cache statistics since the start of the run (reads pending CUDA events: may sync).

        Returns:
            dict: ``slots`` K, ``policy``, ``calls``, ``waves``, ``lookups`` (experts with tokens,
            summed over calls), ``hits``, ``misses`` (copied in), ``hit_rate`` (hits / lookups),
            ``bytes_copied_h2d`` (misses and prefetches), ``copy_s`` (seconds the copies took on the
            copy stream; host wall time on CPU), ``copy_overlapped_s`` (part of the misses' copies
            during the hits' compute), ``device_bytes_buffered`` (the K slots) and
            ``device_bytes_all_resident`` (E_local experts). With ``belady``: ``trace_mismatched_calls``
            (calls that used an expert the trace's same call did not choose, or past its end: a trace
            of other data or flags, so not the offline optimum; a warning names the first).
            With a prefetch predictor also ``prefetch`` (its name), ``prefetches`` (experts copied
            in ahead), ``prefetch_hits`` (used by a call before eviction), ``prefetch_unused``
            (evicted unused, or not used by the end), ``bytes_prefetched``, ``wasted_prefetch_bytes``,
            ``misses_without_prefetch`` / ``bytes_copied_without_prefetch`` (the same policy and
            lookups without prefetching; with CPU experts the lookups left after them) and
            ``misses_saved``. With ``--moe-cpu-experts auto``: ``cpu_experts`` (the mode), ``cpu_runs``
            (expert calls run on the CPU instead of missing; hits + misses + cpu_runs = lookups),
            ``cpu_tokens`` (their token rows), ``cpu_s`` (host seconds), ``copy_bytes_avoided`` and
            ``cpu_cost_rates`` (rates at the end, measured or default).
        """
        if self._pending and self._ref is not None:
            self._read_events(wait=True)
        c = self.cache
        lookups = c.lookups + self.cpu_runs
        out = {
            "slots": self.num_slots,
            "policy": self.policy_name,
            "calls": c.calls,
            "waves": c.waves,
            "lookups": lookups,
            "hits": c.hits,
            "misses": c.misses,
            "hit_rate": round(c.hits / lookups, 6) if lookups else None,
            "bytes_copied_h2d": self.bytes_copied,
            "copy_s": round(self.copy_s, 6),
            "copy_overlapped_s": round(self.overlap_s, 6),
            "device_bytes_buffered": self.bytes_per_expert * self.num_slots,
            "device_bytes_all_resident": self.bytes_per_expert * self.num_experts,
        }
        if self.future is not None:
            out["trace_mismatched_calls"] = self.trace_mismatched_calls
        if self.shadow is not None:
            unused = c.prefetch_evicted_unused + len(c.prefetch_pending)
            out.update({
                "prefetch": self.prefetch_name,
                "prefetches": c.prefetches,
                "prefetch_hits": c.prefetch_hits,
                "prefetch_unused": unused,
                "bytes_prefetched": self.bytes_prefetched,
                "wasted_prefetch_bytes": unused * self.bytes_per_expert,
                "misses_without_prefetch": self.shadow.misses,
                "bytes_copied_without_prefetch": self.shadow.misses * self.bytes_per_expert,
                "misses_saved": self.shadow.misses - c.misses,
            })
        if self.cpu_mode == "auto":
            out.update({
                "cpu_experts": self.cpu_mode,
                "cpu_runs": self.cpu_runs,
                "cpu_tokens": self.cpu_tokens,
                "cpu_s": round(self.cpu_s, 6),
                "copy_bytes_avoided": self.cpu_runs * self.bytes_per_expert,
                "cpu_cost_rates": self.cost.rates() if self.cost is not None else None,
            })
        return out
