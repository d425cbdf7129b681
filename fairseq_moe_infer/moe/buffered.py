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

Each expert computes exactly the function (and, on CPU, the same floating-point operations on
the same rows) as the all-resident store, so outputs do not change. Without CUDA the "device"
is CPU memory and the copies are plain copies: the logic is the same and is tested on CPU.

The full stacks are moved to CPU at the first evaluation forward (after fairseq has loaded the
checkpoint and moved / cast the model), and the device parameters are released then. Buffering
is for inference only: a training forward with a buffer raises :class:`MoEConfigError`.

Statistics (:meth:`ExpertBuffer.stats`): lookups, hits, misses, hit rate, bytes copied host to
device, copy time and the part of it that overlapped the hits' compute (CUDA events), and the
device bytes held by the slots against all-resident experts.
"""

import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .eviction import SlotCache, Wave, build_policy
from .gate import MoEConfigError

_COPY_STREAMS: Dict[torch.device, "torch.cuda.Stream"] = {}


def _copy_stream(device: torch.device):
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device=device)
    return _COPY_STREAMS[device]


class ExpertBuffer:
    """K device slots caching the experts of one :class:`Experts` module.

    Args:
        num_experts: E_local, the experts of the module.
        num_slots: K, 1 <= K <= E_local.
        policy: eviction policy name (``lifo``, ``lru``, ``fifo``, ``lfu``, ``belady``).
        future: belady only: for each call of the layer, the local experts it uses (from a trace).

    Raises:
        MoEConfigError: K out of range, an unknown policy, or belady without ``future``.
    """

    def __init__(self, num_experts: int, num_slots: int, policy: str = "lifo",
                 future: Optional[Sequence[Sequence[int]]] = None):
        if not 1 <= num_slots <= num_experts:
            raise MoEConfigError(
                f"--moe-expert-buffer-size must be between 1 and the {num_experts} experts per rank of a layer "
                f"(0 = all experts resident), got {num_slots}")
        if policy == "belady" and future is None:
            raise MoEConfigError("--moe-buffer-policy belady replays a routing trace: give --moe-buffer-trace PATH "
                                 "(recorded with --moe-record-trace on the same data and flags)")
        try:
            self.cache = SlotCache(num_experts, num_slots, build_policy(policy, num_experts, future))
        except ValueError as e:
            raise MoEConfigError(str(e)) from None
        self.num_experts, self.num_slots, self.policy_name = num_experts, num_slots, policy
        self.future_calls = None if future is None else len(future)
        self.host: Optional[List[Tensor]] = None  # full [E_local, ...] stacks in (pinned) CPU memory
        self.slots: Optional[List[Tensor]] = None  # [K, ...] stacks on the device
        self.bytes_per_expert = 0
        self.bytes_copied = 0
        self.copy_s = 0.0
        self.overlap_s = 0.0
        self._pending: List[tuple] = []  # CUDA events not yet read: (copy start, copy end, compute start, compute end)
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
        if cuda:
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record()

    def adopt(self, other: "ExpertBuffer") -> None:
        """Serve from the host stacks ``other`` already holds (e.g. after the module's parameters
        were released), with this buffer's own K slots on the same device."""
        self.host = other.host
        device = other.slots[0].device
        self.slots = [torch.empty((self.num_slots,) + tuple(h.shape[1:]), dtype=h.dtype, device=device)
                      for h in self.host]
        self.bytes_per_expert = other.bytes_per_expert
        if device.type == "cuda":
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record()

    @property
    def ready(self) -> bool:
        return self.slots is not None

    def _load(self, wave: Wave, device: torch.device):
        """Issue the copies of ``wave.loads``; returns (event when done, timing events) or Nones on CPU."""
        if not wave.loads:
            return None, None
        self.bytes_copied += self.bytes_per_expert * len(wave.loads)
        if device.type != "cuda":
            t0 = time.perf_counter()
            for e, s in wave.loads:
                for slot, host in zip(self.slots, self.host):
                    slot[s].copy_(host[e])
            self.copy_s += time.perf_counter() - t0
            return None, None
        stream = _copy_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # slots may still be read by earlier compute
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            for e, s in wave.loads:
                for slot, host in zip(self.slots, self.host):
                    slot[s].copy_(host[e], non_blocking=True)
            done.record(stream)
        return done, (start, done)

    def _run_wave(self, wave: Wave, device: torch.device, compute) -> None:
        """Copy the wave's misses on the side stream while its hits compute, then compute the misses."""
        arrived, copy_events = self._load(wave, device)
        comp = None
        if wave.resident:
            if copy_events is not None:
                comp = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                comp[0].record()
            compute(wave.resident)
            if comp is not None:
                comp[1].record()
        if wave.loads:
            if arrived is not None:
                torch.cuda.current_stream(device).wait_event(arrived)
            compute(wave.loads)
        if copy_events is not None:
            self._pending.append((copy_events, comp))
            if len(self._pending) > 256:
                self._read_events(len(self._pending) // 2)

    def _read_events(self, n: Optional[int] = None) -> None:
        take, self._pending = (self._pending, []) if n is None else (self._pending[:n], self._pending[n:])
        for (c0, c1), comp in take:
            c1.synchronize()
            a0, a1 = self._ref.elapsed_time(c0), self._ref.elapsed_time(c1)
            self.copy_s += (a1 - a0) / 1e3
            if comp is not None:
                comp[1].synchronize()
                b0, b1 = self._ref.elapsed_time(comp[0]), self._ref.elapsed_time(comp[1])
                self.overlap_s += max(0.0, min(a1, b1) - max(a0, b0)) / 1e3

    # ---- the Experts calls ------------------------------------------------------------
    def forward_grouped(self, experts, x: Tensor, counts: Tensor, expert_of_row: Tensor) -> Tensor:
        """:meth:`Experts.forward_grouped` (same arguments and result) through the slots."""
        from .experts import grouped_gemm_available

        host = counts.tolist()  # the one host sync: which experts have rows
        starts = [0]
        for n in host:
            starts.append(starts[-1] + n)
        active = [e for e, n in enumerate(host) if n]
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
        for wave in self.cache.lookup(active):
            self._run_wave(wave, x.device, compute)
        return out

    def forward_padded(self, experts, x: Tensor) -> Tensor:
        """:meth:`Experts.forward_padded` (same arguments and result) through the slots.

        An expert is used when any of its C capacity rows is non-zero (the static dispatcher's
        unused capacity rows are exactly zero; such an expert's output rows are not combined,
        so they are returned as zeros)."""
        active = torch.nonzero(x.flatten(1).ne(0).any(dim=1)).flatten().tolist()  # host sync
        out = torch.zeros_like(x)
        w1, b1, w2, b2 = self.slots

        def compute(pairs):
            ids = torch.tensor([e for e, _ in pairs], device=x.device)
            slots = torch.tensor([s for _, s in pairs], device=x.device)
            h = torch.baddbmm(b1[slots][:, None, :], x[ids], w1[slots].transpose(1, 2))
            out[ids] = torch.baddbmm(b2[slots][:, None, :], experts._hidden(h), w2[slots].transpose(1, 2))

        for wave in self.cache.lookup(active):
            self._run_wave(wave, x.device, compute)
        return out

    # ---- statistics ---------------------------------------------------------------------
    def stats(self) -> dict:
        """Cache statistics since the start of the run (reads pending CUDA events: may sync).

        Returns:
            dict: ``slots`` K, ``policy``, ``calls``, ``waves``, ``lookups`` (experts with tokens,
            summed over calls), ``hits``, ``misses``, ``hit_rate``, ``bytes_copied_h2d``,
            ``copy_s`` (seconds the copies took on the copy stream; host wall time on CPU),
            ``copy_overlapped_s`` (part of it during the hits' compute), ``device_bytes_buffered``
            (the K slots) and ``device_bytes_all_resident`` (E_local experts).
        """
        if self._pending:
            self._read_events()
        c = self.cache
        return {
            "slots": self.num_slots,
            "policy": self.policy_name,
            "calls": c.calls,
            "waves": c.waves,
            "lookups": c.lookups,
            "hits": c.hits,
            "misses": c.misses,
            "hit_rate": round(c.hits / c.lookups, 6) if c.lookups else None,
            "bytes_copied_h2d": self.bytes_copied,
            "copy_s": round(self.copy_s, 6),
            "copy_overlapped_s": round(self.overlap_s, 6),
            "device_bytes_buffered": self.bytes_per_expert * self.num_slots,
            "device_bytes_all_resident": self.bytes_per_expert * self.num_experts,
        }
