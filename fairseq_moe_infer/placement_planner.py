"""Expert placement planning from routing traces (Huang et al. 2024, Sec. 6; DeepSeek EPLB idea).

Inputs are per-batch expert loads of one MoE layer, ``counts`` [B, E] (tokens routed to each
logical expert in each forward, e.g. :meth:`fairseq_moe_infer.trace.RoutingTrace.expert_counts`).
A plan for G GPUs with S slots each is a list of G * S logical experts (slot ``g * S + j`` on
GPU g), the per-layer entry of a :class:`~fairseq_moe_infer.moe.placement.Placement`.

Policies (:data:`POLICIES`):

* ``contiguous``: GPU g holds experts ``[g * E / G, (g + 1) * E / G)`` (today's sharding);
  spare slots replicate the same experts again in order (G > E: slot i holds expert i mod E).
* ``greedy`` (the paper's "greedy" balancing): experts by descending total load, each onto the
  GPU with the least load so far that has a free slot. The paper has no spare slots; here spare
  slots (S > E / G) get replicas counted by ``replicate``'s rule, all packed greedily, so with
  spare slots ``greedy`` and ``replicate`` give the same plan.
* ``anti_correlation`` (the paper, for decoders): greedy order, but an expert goes to the GPU
  (with a free slot) where it adds least per-batch overload: cost of GPU g =
  ``sum_b max(0, load_g[b] + x[b] - mean_b)`` with ``mean_b`` the batch's balanced GPU load.
  Experts often active in the same batches so end up on different GPUs.
* ``replicate`` (beyond the paper; the idea of DeepSeek-V3's EPLB, written here from its
  description): give the spare slots to the experts with the highest load *per replica*, one
  replica at a time (each replica then carries ``load / n_replicas``, matching the even split
  of :class:`~fairseq_moe_infer.moe.placement.LayerPlacement`), then place the replicas greedily
  (heaviest first onto the least-loaded GPU with a free slot, never two replicas of one expert
  on one GPU while another GPU has room).

Any policy's plan can then be refined by :func:`refine_by_swaps` (``--local-search``): swaps of
two slots' experts that lower the per-step objective, the one greedy does not look at.

Metrics: :func:`gpu_loads` simulates the even replica split; :func:`load_ratios` gives
per-batch max/mean GPU load. :func:`best_balance_bound` is the best ``step_max_over_mean`` any
placement without replication can reach (exact by integer programming, or a lower bound when the
solver's time limit stops it).
"""

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

Plan = List[int]


def _check(num_experts: int, gpus: int, slots: int) -> None:
    if gpus < 1 or slots < 1:
        raise ValueError(f"need at least one GPU and one slot per GPU, got G={gpus}, S={slots}")
    if gpus * slots < num_experts:
        raise ValueError(f"{gpus} GPUs * {slots} slots cannot hold {num_experts} experts; use S >= ceil(E / G)")


def contiguous(counts: np.ndarray, gpus: int, slots: int) -> Plan:
    """Today's sharding: G <= E (G dividing E): GPU g holds ``[g * E / G, (g + 1) * E / G)``, its
    spare slots repeating them; G > E (E dividing G * S): slot i holds expert ``i mod E`` (every
    expert replicated ``G * S / E`` times, one per GPU)."""
    e = counts.shape[1]
    _check(e, gpus, slots)
    if gpus > e:
        if (gpus * slots) % e:
            raise ValueError(f"contiguous placement with G > E needs E ({e}) to divide G * S ({gpus * slots})")
        return [i % e for i in range(gpus * slots)]
    if e % gpus:
        raise ValueError(f"contiguous placement needs G ({gpus}) to divide E ({e})")
    per = e // gpus
    return [g * per + (j % per) for g in range(gpus) for j in range(slots)]


def replica_counts(load: np.ndarray, num_slots: int) -> np.ndarray:
    """Replicas per expert for ``num_slots`` >= E slots: one each, then each spare slot to the
    expert with the highest load per replica (ties: lower id). [E] int64."""
    n = np.ones(len(load), dtype=np.int64)
    for _ in range(num_slots - len(load)):
        n[int(np.argmax(load / n))] += 1
    return n


def _pack(items: Sequence[tuple], gpus: int, slots: int, cost: Callable) -> Plan:
    """Place (expert, per-batch load vector) items in the given order; each onto the GPU with a
    free slot minimising ``cost(gpu_load_vector, item_vector)``, ties to the lower GPU index,
    avoiding a GPU that already holds the same expert when another has room."""
    plan: List[List[int]] = [[] for _ in range(gpus)]
    acc = [np.zeros_like(items[0][1], dtype=np.float64) for _ in range(gpus)]
    for expert, vec in items:
        free = [g for g in range(gpus) if len(plan[g]) < slots]
        fresh = [g for g in free if expert not in plan[g]] or free
        g = min(fresh, key=lambda h: (cost(acc[h], vec), h))
        plan[g].append(expert)
        acc[g] = acc[g] + vec
    return [e for gpu in plan for e in gpu]


def _items(counts: np.ndarray, n: np.ndarray) -> List[tuple]:
    per_batch = counts.astype(np.float64)
    items = [(e, per_batch[:, e] / n[e]) for e in range(counts.shape[1]) for _ in range(n[e])]
    # heaviest first; ties by expert id (stable)
    return sorted(items, key=lambda it: -it[1].sum())


def greedy(counts: np.ndarray, gpus: int, slots: int) -> Plan:
    """The paper's greedy placement (descending total load onto the least-loaded GPU with a
    free slot); spare slots hold replicas chosen as in :func:`replicate`."""
    _check(counts.shape[1], gpus, slots)
    n = replica_counts(counts.sum(0).astype(np.float64), gpus * slots)
    return _pack(_items(counts, n), gpus, slots, lambda acc, vec: acc.sum())


def anti_correlation(counts: np.ndarray, gpus: int, slots: int) -> Plan:
    """Greedy order, but each expert goes to the GPU whose summed per-batch *maximum* grows
    least: cost = sum over batches of the GPU's load with the expert added, above the batch's
    mean GPU load (so co-active experts are kept apart). Spare slots: replicas as in greedy."""
    _check(counts.shape[1], gpus, slots)
    n = replica_counts(counts.sum(0).astype(np.float64), gpus * slots)
    mean = counts.sum(1).astype(np.float64) / gpus
    return _pack(_items(counts, n), gpus, slots, lambda acc, vec: np.maximum(acc + vec - mean, 0).sum() + 1e-9 * acc.sum())


def replicate(counts: np.ndarray, gpus: int, slots: int) -> Plan:
    """Hot-expert replication then greedy packing of the replicas (module docstring)."""
    return greedy(counts, gpus, slots)


LOCAL_SEARCH_S = 5.0  # default time limit of refine_by_swaps per layer, seconds


def refine_by_swaps(counts: np.ndarray, plan: Sequence[int], gpus: int, restarts: int = 10,
                    time_limit_s: float = LOCAL_SEARCH_S, seed: int = 0) -> Plan:
    """Iterated local search on the per-step objective (beyond the paper): :func:`_swap_descent`
    from ``plan``, then ``restarts`` times from the best plan so far with a few random swaps
    applied (a seeded ``numpy`` generator: deterministic), keeping the best; stops early at
    ``time_limit_s`` seconds. Never worse than ``plan``.

    Args:
        counts: [B, E] per-batch tokens per logical expert.
        plan: G * S logical experts (slot g * S + j on GPU g), e.g. :func:`greedy`'s.

    Returns:
        the refined plan (a new list of G * S ints).
    """
    import time

    t0 = time.perf_counter()
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts.sum(1) > 0]
    if counts.shape[0] == 0 or gpus < 2:
        return [int(e) for e in plan]

    def cost(p):
        return gpu_loads(counts, p, gpus).max(1).sum()

    best = _swap_descent(counts, plan, gpus, time_limit_s)
    best_cost = cost(best)
    rng = np.random.default_rng(seed)
    slots = len(plan) // gpus
    for _ in range(restarts):
        if time.perf_counter() - t0 > time_limit_s:
            break
        p = list(best)
        for _ in range(max(2, len(p) // 8)):  # a kick: random swaps between GPUs (duplicates allowed for now)
            a, b = rng.integers(len(p), size=2)
            if a // slots != b // slots:
                p[a], p[b] = p[b], p[a]
        if any(len(set(p[g * slots:(g + 1) * slots])) < len(set(best[g * slots:(g + 1) * slots])) for g in range(gpus)):
            continue  # the kick put two replicas of one expert on one GPU
        p = _swap_descent(counts, p, gpus, time_limit_s - (time.perf_counter() - t0))
        c = cost(p)
        if c < best_cost - 1e-9 * best_cost:
            best, best_cost = p, c
    return best


def _swap_descent(counts: np.ndarray, plan: Sequence[int], gpus: int, time_limit_s: float,
                  max_rounds: int = 50) -> Plan:
    """Steepest-descent swaps for :func:`refine_by_swaps` (``counts`` [B, E] float64 without empty
    batches): repeatedly swap the experts of
    two slots on different GPUs when that lowers ``sum_b max_g load[b, g]`` (the slowest GPU's
    tokens summed over the steps; the balanced part ``sum_b mean_g`` does not depend on the plan),
    taking the best swap for each slot in turn, until no swap helps, ``max_rounds`` passes or
    ``time_limit_s`` seconds. Every GPU keeps its slot count, a swap never puts two replicas of
    one expert on one GPU, and the result is never worse than ``plan`` (greedy balances the run
    totals; the steps are what set the time, see :func:`load_ratios`). Deterministic: slots
    are visited in order, ties keep the current plan."""
    import time

    plan = [int(e) for e in plan]
    slots = len(plan) // gpus
    n = np.bincount(plan, minlength=counts.shape[1]).astype(np.float64)
    per = counts / np.maximum(n, 1)  # [B, E] one replica's load
    load = gpu_loads(counts, plan, gpus)  # [B, G]
    t0 = time.perf_counter()
    for _ in range(max_rounds):
        improved = False
        for a in range(len(plan)):
            ga, ea = a // slots, plan[a]
            best = (0.0, None)
            current = load.max(1)
            for gb in range(gpus):
                if gb == ga:
                    continue
                others = np.delete(load, [ga, gb], axis=1).max(1) if gpus > 2 else np.zeros(load.shape[0])
                cand = [b for b in range(gb * slots, (gb + 1) * slots)
                        if plan[b] != ea and plan[b] not in plan[ga * slots:(ga + 1) * slots]
                        and ea not in plan[gb * slots:(gb + 1) * slots]]
                if not cand:
                    continue
                pb = per[:, [plan[b] for b in cand]]  # [B, c]
                col_a = load[:, ga:ga + 1] - per[:, ea:ea + 1] + pb
                col_b = load[:, gb:gb + 1] + per[:, ea:ea + 1] - pb
                new = np.maximum(np.maximum(col_a, col_b), others[:, None]).sum(0) - current.sum()
                i = int(np.argmin(new))
                if new[i] < best[0] - 1e-9 * current.sum():
                    best = (float(new[i]), cand[i])
            if best[1] is not None:
                b = best[1]
                gb, eb = b // slots, plan[b]
                load[:, ga] += per[:, eb] - per[:, ea]
                load[:, gb] += per[:, ea] - per[:, eb]
                plan[a], plan[b] = eb, ea
                improved = True
            if time.perf_counter() - t0 > time_limit_s:
                return plan
        if not improved:
            break
    return plan


POLICIES: Dict[str, Callable[[np.ndarray, int, int], Plan]] = {
    "contiguous": contiguous,
    "greedy": greedy,
    "anti_correlation": anti_correlation,
    "replicate": replicate,
}


def plan_layer(policy: str, counts: np.ndarray, gpus: int, slots: int, local_search: bool = False,
               search_time_s: float = LOCAL_SEARCH_S) -> Plan:
    """Run ``policy`` on one layer's [B, E] counts, then (``local_search``) :func:`refine_by_swaps`
    (at most ``search_time_s`` seconds).

    ``greedy`` and ``anti_correlation`` with spare slots (S > E / G) fill them with replicas
    as ``replicate`` does; without spare slots ``replicate`` equals ``greedy``.

    Raises:
        ValueError: unknown policy, or G * S < E.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy '{policy}'; choose one of {', '.join(POLICIES)}")
    plan = POLICIES[policy](np.asarray(counts), gpus, slots)
    if local_search and policy != "contiguous":
        plan = refine_by_swaps(counts, plan, gpus, time_limit_s=search_time_s)
    return plan


def gpu_loads(counts: np.ndarray, plan: Sequence[int], gpus: int) -> np.ndarray:
    """Per-batch GPU loads [B, G] float64 under ``plan``: each expert's tokens split evenly over
    its replicas (what :class:`~fairseq_moe_infer.moe.placement.LayerPlacement` does, up to
    one token of rounding per replica)."""
    counts = np.asarray(counts, dtype=np.float64)
    plan = np.asarray(plan)
    slots = len(plan) // gpus
    n = np.bincount(plan, minlength=counts.shape[1]).astype(np.float64)
    per_slot = counts[:, plan] / n[plan]
    return per_slot.reshape(counts.shape[0], gpus, slots).sum(2)


def load_ratios(loads: np.ndarray) -> Dict[str, Optional[float]]:
    """Imbalance of per-batch GPU loads [B, G] (batches with no load are skipped).

    Returns:
        ``step_max_over_mean``: sum_b max_g / sum_b mean_g -- the time of the slowest GPU
        summed over steps over the balanced time (time proportional to tokens); the headline;
        ``mean_batch_max_over_mean``: mean over batches of max_g / mean_g;
        ``worst_batch_max_over_mean``: its maximum;
        ``run_max_over_mean``: of the loads summed over the run (what totals show);
        ``batches``: batches counted. Ratios are None without load.
    """
    loads = np.asarray(loads, dtype=np.float64)
    loads = loads[loads.sum(1) > 0] if loads.size else loads.reshape(0, max(loads.shape[-1], 1))
    if loads.shape[0] == 0:
        return {"step_max_over_mean": None, "mean_batch_max_over_mean": None, "worst_batch_max_over_mean": None,
                "run_max_over_mean": None, "batches": 0}
    mx, mean = loads.max(1), loads.mean(1)
    total = loads.sum(0)
    return {
        "step_max_over_mean": float(mx.sum() / mean.sum()),
        "mean_batch_max_over_mean": float((mx / mean).mean()),
        "worst_batch_max_over_mean": float((mx / mean).max()),
        "run_max_over_mean": float(total.max() / total.mean()),
        "batches": int(loads.shape[0]),
    }


def best_balance_bound(counts: np.ndarray, gpus: int, slots: int, time_limit_s: float = 20.0) -> Dict[str, object]:
    """The best ``step_max_over_mean`` any placement *without replication* (each expert on
    exactly one GPU, at most ``slots`` per GPU) can reach on ``counts`` [B, E], or a lower bound.

    Three bounds, the largest is returned:

    * per batch (closed form): ``max(mean_b, h_b)`` where ``h_b`` is batch b's heaviest expert,
      plus, when ``G * S == E`` (every slot filled), its ``S - 1`` lightest experts (the GPU
      holding the heaviest holds S experts);
    * over the run: ``sum_b max_g >= max_g sum_b``, and the best max over GPUs of the summed
      loads is solved exactly as a small integer program;
    * the full problem as a mixed-integer program with scipy's HiGHS (``scipy.optimize.milp``):
      binary ``y[e, g]``, ``z_b >= sum_e x[b, e] y[e, g]``, minimise ``sum_b z_b``; stopped
      after ``time_limit_s`` (its dual bound then), exact when it finishes.

    Returns:
        ``bound`` (float, a lower bound on the ratio, the optimum when ``exact``), ``exact``
        (bool), ``best_found`` (the best placement's ratio the solver found, or None),
        ``closed_form``, ``run_level`` (the first two bounds).

    Raises:
        ImportError: scipy is not installed (``pip install scipy``).
    """
    x = np.asarray(counts, dtype=np.float64)
    x = x[x.sum(1) > 0]
    if gpus == 1:
        return {"bound": 1.0, "exact": True, "best_found": 1.0, "closed_form": 1.0, "run_level": 1.0}
    b, e = x.shape
    _check(e, gpus, slots)
    total = x.sum() / gpus
    srt = np.sort(x, axis=1)
    per_batch = srt[:, -1] + (srt[:, : slots - 1].sum(1) if gpus * slots == e else 0.0)
    closed = float(np.maximum(x.sum(1) / gpus, per_batch).sum() / total)
    run = _solve(x.sum(0, keepdims=True), gpus, slots, time_limit_s)
    run_level = float(run[0] / total) if run[2] else closed
    full = _solve(x, gpus, slots, time_limit_s)
    full_bound = float(full[1] / total) if full[1] is not None and np.isfinite(full[1]) else 0.0
    if full[2]:
        v = float(full[0] / total)
        return {"bound": v, "exact": True, "best_found": v, "closed_form": closed, "run_level": run_level}
    return {"bound": max(closed, run_level, full_bound), "exact": False,
            "best_found": None if full[0] is None else float(full[0] / total), "closed_form": closed, "run_level": run_level}


def _solve(x: np.ndarray, gpus: int, slots: int, time_limit_s: float):
    """min sum_b max_g load; returns (best objective or None, dual bound or None, optimal?)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    b, e = x.shape
    # variables: y[e, g] (e * G + g), then z[b]
    ny = e * gpus
    c = np.concatenate([np.zeros(ny), np.ones(b)])
    rows, cols, vals = [], [], []
    r = 0
    for g in range(gpus):  # sum_e x[b, e] y[e, g] - z_b <= 0
        for bb in range(b):
            nz = np.nonzero(x[bb])[0]
            rows += [r] * (len(nz) + 1)
            cols += [int(k) * gpus + g for k in nz] + [ny + bb]
            vals += list(x[bb, nz]) + [-1.0]
            r += 1
    n_load = r
    for k in range(e):  # each expert on exactly one GPU
        rows += [r] * gpus
        cols += [k * gpus + g for g in range(gpus)]
        vals += [1.0] * gpus
        r += 1
    for g in range(gpus):  # at most S experts per GPU
        rows += [r] * e
        cols += [k * gpus + g for k in range(e)]
        vals += [1.0] * e
        r += 1
    a = coo_matrix((vals, (rows, cols)), shape=(r, ny + b)).tocsr()
    lo = np.concatenate([np.full(n_load, -np.inf), np.ones(e), np.zeros(gpus)])
    hi = np.concatenate([np.zeros(n_load), np.ones(e), np.full(gpus, slots)])
    # symmetry: the heaviest expert on GPU 0
    ub = np.concatenate([np.ones(ny), np.full(b, np.inf)])
    lb = np.zeros(ny + b)
    heaviest = int(np.argmax(x.sum(0)))
    lb[heaviest * gpus] = 1.0
    res = milp(c, constraints=LinearConstraint(a, lo, hi), integrality=np.concatenate([np.ones(ny), np.zeros(b)]),
               bounds=Bounds(lb, ub), options={"time_limit": time_limit_s, "disp": False})
    dual = getattr(res, "mip_dual_bound", None)
    return (float(res.fun) if res.x is not None else None), (None if dual is None else float(dual)), res.status == 0


def trace_layer_counts(paths: Sequence[str]) -> Dict[str, np.ndarray]:
    """Per-batch expert loads of every MoE layer from routing traces (``--moe-record-trace``).

    Args:
        paths: trace files (:func:`fairseq_moe_infer.trace.read_trace`); several files (runs)
            are concatenated batch after batch. An expert-parallel run's rank files
            (``PATH.rank<r>`` beside ``PATH``) are read with it and summed call by call: the
            ranks' r-th calls of a layer are one step.

    Returns:
        layer name -> [B, E] int64 tokens per expert per forward.

    Raises:
        fairseq_moe_infer.trace.TraceError: unreadable traces, or traces of other models
            (another expert count or layer list than the first).
    """
    from .trace import read_run_traces

    out: Dict[str, List[np.ndarray]] = {}
    first = None
    for path in paths:
        ranks = read_run_traces(path, *(first or (None, None)))
        t = ranks[0]
        first = first or (t.num_experts, t.layer_names)
        for name in t.layer_names:
            per_rank = [r.expert_counts(name) for r in ranks]
            n = min(len(c) for c in per_rank)
            out.setdefault(name, []).append(sum(c[:n] for c in per_rank))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def plan_placement(policy: str, layer_counts: Dict[str, np.ndarray], gpus: int, slots: int,
                   local_search: bool = False, search_time_s: float = LOCAL_SEARCH_S, **extra):
    """A :class:`~fairseq_moe_infer.moe.placement.Placement` of every layer by ``policy``
    (then :func:`refine_by_swaps` when ``local_search``, at most ``search_time_s`` seconds per layer).

    Args:
        layer_counts: :func:`trace_layer_counts`'s output.
        extra: recorded in the file (e.g. the traces planned on).
    """
    from .moe.placement import Placement

    e = next(iter(layer_counts.values())).shape[1]
    plans = {name: [int(v) for v in plan_layer(policy, c, gpus, slots, local_search, search_time_s)]
             for name, c in layer_counts.items()}
    return Placement(gpus, slots, e, plans, {"policy": policy, "local_search": local_search, **extra})


def placement_ratios(placement, layer_counts: Dict[str, np.ndarray]) -> Dict[str, object]:
    """Simulated GPU-load ratios of ``placement`` on ``layer_counts`` (each layer's steps run
    one after another, so a stack's time is the sum over its layers' steps).

    Returns:
        ``layers``: name -> :func:`load_ratios`; per stack (``encoder`` / ``decoder``):
        ``step_max_over_mean`` over all its layers' steps (sum of max over sum of mean) and
        ``worst_layer`` (the largest layer ratio).
    """
    layers, stacks = {}, {}
    for name, c in layer_counts.items():
        loads = gpu_loads(c, placement.layers[name], placement.world_size)
        layers[name] = load_ratios(loads)
        keep = loads[loads.sum(1) > 0]
        s = stacks.setdefault(name.split(".")[0], [0.0, 0.0, 0.0])
        s[0] += keep.max(1).sum() if keep.size else 0.0
        s[1] += keep.mean(1).sum() if keep.size else 0.0
        s[2] = max(s[2], layers[name]["step_max_over_mean"] or 0.0)
    return {"layers": layers, **{k: {"step_max_over_mean": v[0] / v[1] if v[1] else None, "worst_layer": v[2]}
                                 for k, v in stacks.items()}}
