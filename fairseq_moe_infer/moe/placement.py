"""Expert placement: the map between the gate's logical experts and physical expert slots.

Huang et al. 2024 (arXiv 2303.06182), Sec. 6 "Expert load balancing": under expert
parallelism the GPU holding the busiest experts sets the time of every step, so experts are
*placed* on GPUs by measured load; beyond the paper (as DeepSeek-V3's EPLB does) the hottest
experts may get several *replicas*.

A placement for one MoE layer lists, for each of the ``world * slots_per_rank`` physical
slots, the logical expert whose weights it holds; rank ``r`` holds slots
``[r * S, (r + 1) * S)``. Every logical expert has at least one slot; an expert with ``n``
slots has ``n`` replicas. :class:`LayerPlacement` sits between the gate and the dispatcher:
it rewrites a :class:`~fairseq_moe_infer.moe.gate.Routing` over E logical experts into one
over the physical slots, which the dispatchers treat exactly as they treat experts without a
placement (they never learn about it). Tokens routed to a replicated expert are split evenly
between its replicas by the order of the choice among this rank's choices of that expert
(token-major: token 0's choices first): the j-th choice of expert e goes to replica
``j mod n_e``. Replicas hold the same weights, so the output does not depend on the split
(for dynamic gating always, for static gating when nothing is dropped: a replica has its own
capacity).

The identity placement (``slots_per_rank = E / world``, slot i holds expert i) is today's
contiguous sharding; with it :meth:`LayerPlacement.route` returns the routing unchanged.

A placement file (``--moe-placement PATH``) is JSON::

    {"format": "fairseq_moe_infer.placement", "version": 1,
     "world_size": 2, "slots_per_rank": 3, "num_experts": 4,
     "layers": {"decoder.layers.1.moe_layer": [0, 2, 3, 1, 2, 0], ...}}

``layers`` maps every MoE layer's module name (as :func:`~fairseq_moe_infer.moe.moe_layers`
names them, in any order) to the logical expert of each of its ``world_size * slots_per_rank``
slots. Optional keys (``policy``, ``trace`` ...) are kept and ignored.
"""

import json
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from .gate import MoEConfigError, Routing

FORMAT = "fairseq_moe_infer.placement"
VERSION = 1


def check_slots(slots: Sequence[int], num_experts: int, world_size: int, slots_per_rank: int, where: str = "") -> None:
    """Check one layer's slot list.

    Raises:
        MoEConfigError: wrong length, an id outside ``[0, E)``, or an expert with no slot.
    """
    at = f" ({where})" if where else ""
    if len(slots) != world_size * slots_per_rank:
        raise MoEConfigError(
            f"placement{at}: {len(slots)} slots, expected world_size * slots_per_rank = {world_size} * {slots_per_rank}"
        )
    bad = [s for s in slots if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < num_experts]
    if bad:
        raise MoEConfigError(f"placement{at}: slot expert {bad[0]!r} is not an expert id in [0, {num_experts})")
    missing = sorted(set(range(num_experts)) - set(slots))
    if missing:
        raise MoEConfigError(f"placement{at}: expert(s) {missing} have no slot; give every expert at least one slot")


@dataclass
class Placement:
    """A placement of every MoE layer of a model (the ``--moe-placement`` file).

    Attributes:
        world_size: expert-parallel ranks W.
        slots_per_rank: S, expert slots per rank (``>= E / W``; spare slots hold replicas).
        num_experts: E, logical experts per layer.
        layers: MoE-layer module name -> [W * S] logical expert of each slot.
        extra: other keys of the file (kept when written back).
    """

    world_size: int
    slots_per_rank: int
    num_experts: int
    layers: Dict[str, List[int]]
    extra: Dict = field(default_factory=dict)

    def __post_init__(self):
        for name, value in (("world_size", self.world_size), ("slots_per_rank", self.slots_per_rank),
                            ("num_experts", self.num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MoEConfigError(f"placement: {name} must be a positive integer, got {value!r}")
        if self.world_size * self.slots_per_rank < self.num_experts:
            raise MoEConfigError(
                f"placement: {self.world_size} ranks * {self.slots_per_rank} slots cannot hold {self.num_experts} experts"
            )
        for name, slots in self.layers.items():
            check_slots(slots, self.num_experts, self.world_size, self.slots_per_rank, name)

    @classmethod
    def identity(cls, layer_names: Sequence[str], num_experts: int, world_size: int) -> "Placement":
        """Today's contiguous sharding: rank r holds experts ``[r * E / W, (r + 1) * E / W)``."""
        return cls(world_size, num_experts // world_size, num_experts, {n: list(range(num_experts)) for n in layer_names})

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "world_size": self.world_size, "slots_per_rank": self.slots_per_rank,
                "num_experts": self.num_experts, **self.extra, "layers": self.layers}

    def save(self, path: str) -> None:
        """Write the JSON file (one line per layer)."""
        d = self.to_json()
        layers = d.pop("layers")
        head = json.dumps(d)[:-1]
        body = ",\n".join(f"  {json.dumps(n)}: {json.dumps(s)}" for n, s in layers.items())
        with open(path, "w") as f:
            f.write(f'{head}, "layers": {{\n{body}\n}}}}\n')

    def check_model(self, layer_names: Sequence[str], num_experts: int, world_size: int) -> None:
        """Check the placement fits a model run on ``world_size`` expert-parallel ranks.

        Raises:
            MoEConfigError: another world size, expert count or set of MoE layers.
        """
        fix = "plan a placement for this model and world size with scripts/plan_placement.py"
        if self.world_size != world_size:
            raise MoEConfigError(f"--moe-placement is for world size {self.world_size}, this run has {world_size}; {fix}")
        if self.num_experts != num_experts:
            raise MoEConfigError(f"--moe-placement is for {self.num_experts} experts, the model has {num_experts}; {fix}")
        if sorted(self.layers) != sorted(layer_names):
            raise MoEConfigError(
                f"--moe-placement lists {len(self.layers)} MoE layers, the model has {len(layer_names)} "
                f"(missing: {sorted(set(layer_names) - set(self.layers))[:3]}, "
                f"unknown: {sorted(set(self.layers) - set(layer_names))[:3]}); {fix}"
            )


def load_placement(path: str) -> Placement:
    """Read a placement file (format in the module docstring).

    Raises:
        MoEConfigError: unreadable file, wrong format/version, or an invalid layer map.
    """
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise MoEConfigError(f"--moe-placement {path}: cannot read it as JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
        raise MoEConfigError(
            f"--moe-placement {path}: not a placement file (needs format '{FORMAT}', version {VERSION}); "
            "write one with scripts/plan_placement.py"
        )
    try:
        layers = {str(k): list(v) for k, v in d["layers"].items()}
        known = ("format", "version", "world_size", "slots_per_rank", "num_experts", "layers")
        return Placement(d["world_size"], d["slots_per_rank"], d["num_experts"], layers,
                         {k: v for k, v in d.items() if k not in known})
    except (KeyError, AttributeError, TypeError) as e:
        raise MoEConfigError(f"--moe-placement {path}: missing or malformed field ({e})") from None
    except MoEConfigError as e:
        raise MoEConfigError(f"--moe-placement {path}: {e}") from None


class LayerPlacement(torch.nn.Module):
    """One layer's logical expert -> physical slot map (between gate and dispatcher).

    Args:
        slots: [W * S] logical expert of each physical slot (see module docstring).
        num_experts: E.
        world_size: W; rank r holds slots ``[r * S, (r + 1) * S)``.

    Raises:
        MoEConfigError: see :func:`check_slots`.

    Buffers (not saved in state dicts): ``slot_expert`` [P] int64, ``replica_slots`` [E, R]
    int64 (slots of each expert, padded with its first slot), ``num_replicas`` [E] int64.
    """

    def __init__(self, slots: Sequence[int], num_experts: int, world_size: int = 1):
        super().__init__()
        slots = [int(s) for s in slots]
        if len(slots) % world_size:
            raise MoEConfigError(f"placement: {len(slots)} slots do not split over {world_size} ranks")
        self.world_size, self.slots_per_rank = world_size, len(slots) // world_size
        check_slots(slots, num_experts, world_size, self.slots_per_rank)
        self.num_experts, self.num_slots = num_experts, len(slots)
        per_expert = [[p for p, e in enumerate(slots) if e == x] for x in range(num_experts)]
        r = max(len(s) for s in per_expert)
        self.is_identity = slots == list(range(num_experts))
        self.has_replicas = r > 1
        self.slots = [int(e) for e in slots]  # host copy: the buffers may be on the meta device
        self._per_expert, self._max_replicas = per_expert, r
        self.register_buffer("slot_expert", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("replica_slots", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("num_replicas", torch.empty(0, dtype=torch.long), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)fill the index buffers from the map, on their current device: after a model built on
        the meta device was materialised with ``to_empty`` (which leaves buffers uninitialised)."""
        device = self.slot_expert.device
        if device.type == "meta":
            device = torch.device("cpu")
        r, per_expert = self._max_replicas, self._per_expert
        self.slot_expert = torch.tensor(self.slots, dtype=torch.long, device=device)
        self.replica_slots = torch.tensor([s + s[:1] * (r - len(s)) for s in per_expert], dtype=torch.long, device=device)
        self.num_replicas = torch.tensor([len(s) for s in per_expert], dtype=torch.long, device=device)

    def local_experts(self, rank: int) -> List[int]:
        """Logical expert of each of ``rank``'s S slots."""
        s = self.slots_per_rank
        return self.slots[rank * s : (rank + 1) * s]

    def route(self, routing: Routing) -> Routing:
        """The routing over physical slots.

        Args:
            routing: the gate's decision, ``expert_indices`` [T, k] logical experts.

        Returns:
            the same routing with ``expert_indices`` [T, k] int64 physical slots and
            ``num_experts`` = W * S; probabilities, validity and l_aux unchanged.
            The identity placement returns ``routing`` itself.
        """
        if self.is_identity:
            return routing
        idx = routing.expert_indices
        if not self.has_replicas:
            slot = self.replica_slots[:, 0][idx]
        else:
            flat = torch.where(routing.valid, idx, self.num_experts).reshape(-1)  # token-major; invalid last
            order = torch.argsort(flat, stable=True)
            counts = torch.zeros(self.num_experts + 1, dtype=torch.long, device=idx.device)
            counts.scatter_add_(0, flat, torch.ones_like(flat))
            starts = counts.cumsum(0) - counts
            pos = torch.empty_like(flat)
            pos[order] = torch.arange(flat.numel(), device=idx.device) - starts[flat[order]]
            e = flat.clamp(max=self.num_experts - 1)
            replica = pos % self.num_replicas[e]
            slot = self.replica_slots[e, replica].view_as(idx)
        return Routing(slot, routing.probs, routing.valid, routing.l_aux, self.num_slots, routing.renormalize_after_dropping)

    def logical_counts(self, slot_counts: Tensor) -> Tensor:
        """[P] per-slot counts -> [E] per-logical-expert counts (sum over replicas)."""
        if self.is_identity:
            return slot_counts
        return torch.zeros(self.num_experts, dtype=slot_counts.dtype, device=slot_counts.device).index_add_(
            0, self.slot_expert, slot_counts
        )

    def rank_loads(self, slot_counts: Tensor) -> Tensor:
        """[P] per-slot counts -> [W] per-rank sums."""
        return slot_counts.view(self.world_size, self.slots_per_rank).sum(1)

    def extra_repr(self) -> str:
        return f"world_size={self.world_size}, slots_per_rank={self.slots_per_rank}, identity={self.is_identity}"


def identity_placement(num_experts: int, world_size: int = 1) -> LayerPlacement:
    """The contiguous sharding as a :class:`LayerPlacement`."""
    return LayerPlacement(list(range(num_experts)), num_experts, world_size)


__all__ = ["FORMAT", "VERSION", "LayerPlacement", "Placement", "check_slots", "identity_placement", "load_placement"]
