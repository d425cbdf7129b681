"""Eviction policies and the slot cache of expert buffering (Huang et al. 2024, Sec. 5).

An expert cache holds K of a layer's experts in GPU slots. :class:`SlotCache` is its
bookkeeping, plain Python, shared by the buffered expert store
(:mod:`fairseq_moe_infer.moe.buffered`) and the trace-driven simulator
(``scripts/simulate_buffering.py``), so both make exactly the same decisions. Each call of
the layer is one *lookup* of the experts that received tokens; an expert already in a slot
is a *hit*, otherwise a *miss* that is copied in, evicting a resident expert chosen by the
policy. Policies (``--moe-buffer-policy``) are small classes in one registry, each
answering one question: which of these resident experts to evict.

* ``lifo``: the most recently loaded one (the paper's choice: last in, first out);
* ``fifo``: the earliest loaded one;
* ``lru``: the least recently used one (hit or loaded);
* ``lfu``: the least often used one so far (ties: least recently used);
* ``belady``: the one whose next use is farthest in the future (never used again first),
  the offline optimum (Belady 1966), replaying a routing trace.

Experts needed by the current call and not yet computed are never evicted. A call that
needs more than K experts is split into waves of at most K resident experts.

Prefetching (``--moe-prefetch``, :mod:`fairseq_moe_infer.moe.prefetch`): between two lookups,
:meth:`SlotCache.prefetch` loads predicted experts into slots, evicting by the same policy
(:meth:`EvictionPolicy.on_prefetch` tells the policy; a predicted expert is never evicted). A
prefetched expert used by a later lookup before it is evicted is a *prefetch hit*; one evicted
(or still waiting at the end) unused is a wasted prefetch.
"""

import bisect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Type

from .registry import class_registrar


class EvictionPolicy:
    """Base class: chooses the expert to evict. Time ``t`` is the index of the layer's lookup.

    Args:
        num_experts: experts of the layer (local experts under expert parallelism).
    """

    name = ""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def on_hit(self, expert: int, t: int) -> None:
        """``expert`` was resident and used at lookup ``t``."""

    def on_load(self, expert: int, t: int) -> None:
        """``expert`` was copied into a slot (and used) at lookup ``t``."""

    def on_prefetch(self, expert: int, t: int) -> None:
        """``expert`` was copied into a slot after lookup ``t``, before any use (a prefetch).
        By default a load: it enters the policy's order as a newly loaded expert."""
        self.on_load(expert, t)

    def on_evict(self, expert: int) -> None:
        """``expert`` left its slot."""

    def victim(self, candidates: Sequence[int], t: int) -> int:
        """The expert of ``candidates`` (resident, evictable, non-empty) to evict at lookup ``t``."""
        raise NotImplementedError


POLICIES: Dict[str, Type[EvictionPolicy]] = {}


register_policy = class_registrar(POLICIES, "--moe-buffer-policy")


class _Stamped(EvictionPolicy):
    """Keeps one number per expert; evicts the candidate with the smallest (or largest) one."""

    largest = False

    def __init__(self, num_experts: int):
        super().__init__(num_experts)
        self.key: Dict[int, Tuple] = {}
        self.clock = 0

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def on_evict(self, expert):
        self.key.pop(expert, None)

    def victim(self, candidates, t):
        pick = max if self.largest else min
        return pick(candidates, key=lambda e: self.key[e])


@register_policy("lifo")
class LIFO(_Stamped):
    """Evict the most recently loaded expert (Huang et al. 2024, Sec. 5)."""

    largest = True

    def on_load(self, expert, t):
        self.key[expert] = (self._tick(),)


@register_policy("fifo")
class FIFO(_Stamped):
    """Evict the earliest loaded expert."""

    def on_load(self, expert, t):
        self.key[expert] = (self._tick(),)


@register_policy("lru")
class LRU(_Stamped):
    """Evict the least recently used expert."""

    def on_hit(self, expert, t):
        self.key[expert] = (self._tick(),)

    on_load = on_hit


@register_policy("lfu")
class LFU(_Stamped):
    """Evict the least frequently used expert (uses counted since the start of the run, also while
    not resident); ties go to the least recently used."""

    def __init__(self, num_experts):
        super().__init__(num_experts)
        self.uses = [0] * num_experts

    def on_hit(self, expert, t):
        self.uses[expert] += 1
        self.key[expert] = (self.uses[expert], self._tick())

    on_load = on_hit

    def on_prefetch(self, expert, t):  # resident, but not a use
        self.key[expert] = (self.uses[expert], self._tick())


@register_policy("belady")
class Belady(EvictionPolicy):
    """Evict the expert whose next use is farthest in the future (Belady's MIN, the offline optimum).

    Args:
        num_experts: experts of the layer.
        future: for each lookup ``t`` of the layer, the experts it will use (from a routing
            trace, :func:`fairseq_moe_infer.trace.read_trace`). Lookups past the end of
            ``future`` see no next use for any expert (ties: lowest expert id).
    """

    def __init__(self, num_experts: int, future: Optional[Sequence[Sequence[int]]] = None):
        super().__init__(num_experts)
        if future is None:
            raise ValueError("the belady policy needs the future lookups (a routing trace)")
        self.uses: List[List[int]] = [[] for _ in range(num_experts)]
        for t, experts in enumerate(future):
            for e in experts:
                self.uses[int(e)].append(t)
        self.length = len(future)

    def next_use(self, expert: int, t: int) -> float:
        """The first lookup after ``t`` that uses ``expert`` (inf if none)."""
        u = self.uses[expert]
        i = bisect.bisect_right(u, t)
        return u[i] if i < len(u) else float("inf")

    def victim(self, candidates, t):
        return max(candidates, key=lambda e: (self.next_use(e, t), -e))


def build_policy(name: str, num_experts: int, future=None) -> EvictionPolicy:
    """Policy ``name`` for a layer of ``num_experts`` experts (``future``: belady only).

    Raises:
        ValueError: unknown name, or belady without ``future``.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown --moe-buffer-policy '{name}'; choose one of {', '.join(sorted(POLICIES))}")
    return Belady(num_experts, future) if name == "belady" else POLICIES[name](num_experts)


@dataclass
class Wave:
    """One group of experts computed together: ``resident`` (expert, slot) pairs were hits and
    can compute at once; ``loads`` (expert, slot) pairs are copied in first."""

    resident: List[Tuple[int, int]] = field(default_factory=list)
    loads: List[Tuple[int, int]] = field(default_factory=list)


class SlotCache:
    """K slots holding experts of one layer; decides hits, loads and evictions.

    Args:
        num_experts: experts of the layer (E_local).
        num_slots: K >= 1.
        policy: an :class:`EvictionPolicy`.

    Counters: ``lookups`` (experts looked up, one per expert with tokens per call), ``hits``,
    ``misses``, ``calls``, ``waves`` (groups computed; more than calls when a call needed more
    than K experts); prefetching: ``prefetches`` (experts loaded by :meth:`prefetch`),
    ``prefetch_hits`` (of those, used by a lookup before leaving their slot) and
    ``prefetch_evicted_unused``; :attr:`prefetch_pending` holds the prefetched experts not used yet.
    """

    def __init__(self, num_experts: int, num_slots: int, policy: EvictionPolicy):
        if num_slots < 1:
            raise ValueError(f"an expert cache needs at least one slot, got {num_slots}")
        self.num_experts, self.num_slots, self.policy = num_experts, num_slots, policy
        self.expert_in: List[int] = [-1] * num_slots
        self.slot_of: Dict[int, int] = {}
        self.t = 0
        self.lookups = self.hits = self.misses = self.calls = self.waves = 0
        self.prefetches = self.prefetch_hits = self.prefetch_evicted_unused = 0
        self.prefetch_pending: set = set()

    def _evict(self, victim: int) -> int:
        """Take ``victim`` out of its slot; returns the slot."""
        s = self.slot_of.pop(victim)
        self.expert_in[s] = -1
        self.policy.on_evict(victim)
        if victim in self.prefetch_pending:
            self.prefetch_pending.discard(victim)
            self.prefetch_evicted_unused += 1
        return s

    def prefetch(self, experts: Sequence[int]) -> List[Tuple[int, int]]:
        """Load predicted experts before the next lookup needs them.

        Args:
            experts: the experts predicted to be used by the next lookup, most likely first
                (duplicates ignored).

        Returns:
            the (expert, slot) pairs to copy in, in order. The first K distinct predicted experts
            are wanted resident: those not resident take a free slot or evict (by the policy) a
            resident expert that is not predicted at all; no predicted expert is evicted, so when
            every resident expert is predicted the rest are not loaded.
        """
        predicted = list(dict.fromkeys(int(e) for e in experts))
        want, keep = predicted[: self.num_slots], set(predicted)
        t = self.t - 1  # the last lookup: uses from the next lookup on are in the future
        loads = []
        for e in want:
            if e in self.slot_of:
                continue
            free = [s for s, x in enumerate(self.expert_in) if x < 0]
            if free:
                s = free[0]
            else:
                evictable = [x for x in self.expert_in if x >= 0 and x not in keep]
                if not evictable:
                    break
                s = self._evict(self.policy.victim(evictable, t))
            self.expert_in[s] = e
            self.slot_of[e] = s
            self.policy.on_prefetch(e, t)
            self.prefetch_pending.add(e)
            self.prefetches += 1
            loads.append((e, s))
        return loads

    def lookup(self, active: Sequence[int]) -> List[Wave]:
        """Make the experts of ``active`` (distinct ids, in the order to compute) resident, in waves.

        Returns:
            the waves, in order; the first holds all hits. Every expert of ``active`` appears in
            exactly one wave, and no wave holds more than K experts.
        """
        t = self.t
        self.t += 1
        self.calls += 1
        hits = [e for e in active if e in self.slot_of]
        remaining = [e for e in active if e not in self.slot_of]
        self.lookups += len(active)
        self.hits += len(hits)
        self.misses += len(remaining)
        for e in hits:
            self.policy.on_hit(e, t)
            if e in self.prefetch_pending:
                self.prefetch_pending.discard(e)
                self.prefetch_hits += 1
        needed = set(active)
        done = set()
        waves = []
        first = True
        while first or remaining:
            free = [s for s, e in enumerate(self.expert_in) if e < 0]
            evictable = [e for e in self.expert_in if e >= 0 and (e not in needed or e in done)]
            n = min(len(remaining), len(free) + len(evictable))
            wave = Wave(resident=[(e, self.slot_of[e]) for e in hits] if first else [])
            for e in remaining[:n]:
                if free:
                    s = free.pop(0)
                else:
                    v = self.policy.victim(evictable, t)
                    evictable.remove(v)
                    s = self._evict(v)
                self.expert_in[s] = e
                self.slot_of[e] = s
                self.policy.on_load(e, t)
                wave.loads.append((e, s))
            remaining = remaining[n:]
            done.update(e for e, _ in wave.resident + wave.loads)
            if wave.resident or wave.loads:
                waves.append(wave)
            first = False
        self.waves += len(waves)
        return waves
