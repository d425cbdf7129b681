"""Prefetch predictors of expert buffering (``--moe-prefetch``).

Beyond the paper's buffering (Huang et al. 2024, Sec. 5, which copies a missed expert in when a
call needs it), a predictor guesses the experts of a buffered MoE layer's *next* call and hands
them to that layer's store, :meth:`~fairseq_moe_infer.moe.buffered.ExpertBuffer.prefetch`, which
puts them in slots through its own eviction policy and starts their copies at once on the side
stream. The predictor knows nothing of the policy, the store nothing of the predictor. Both
predictors are observers (module forward hooks, like the routing-trace recorder); outputs never
change (a call waits for a prefetched slot's copy before using it).

* ``gate``: when MoE layer i of a stack (encoder, decoder, an LM's decoder) routes its tokens,
  the gate of the stack's next MoE layer j is applied to the same hidden states (layer i's MoE
  input), and j's experts are prefetched, most predicted tokens first: the idea of Pre-gated
  MoE (Hwang et al., ISCA 2024) and SiDA (Du et al., MLSys 2024), here with the trained gates as
  they are. The stack's first MoE layer is never predicted. The prediction's token counts are
  copied to the host behind the routing that layer i's store reads anyway, so it adds no sync.
* ``previous-step``: after each call of a layer, the K experts of that call with the most token
  rows (K = the layer's slots) are prefetched: in incremental decoding (fairseq-generate,
  interactive) the next call of a decoder layer is the next decoding step, whose busiest experts
  are mostly this one's. (After an encoder or LM call the next call is the next batch.) Only the
  K busiest are predicted: the store never evicts a predicted expert, and every expert resident
  after a call was used by it.

A prediction is a claim that those experts will be used: the store loads the first K and evicts
only experts that are not predicted (:meth:`~fairseq_moe_infer.moe.eviction.SlotCache.prefetch`).

:func:`ranked_experts` is the one ordering rule, shared with the trace-driven simulator
(``scripts/simulate_buffering.py --prefetch``), which replays ``previous-step`` exactly.
"""

from typing import Dict, List, Optional, Sequence, Type

import torch
from torch import nn

from .gate import MoEConfigError
from .moe_layer import moe_layers
from .registry import class_registrar

PREDICTORS: Dict[str, Type["ExpertPredictor"]] = {}


register_predictor = class_registrar(PREDICTORS, "--moe-prefetch")


def ranked_experts(counts: Sequence[int]) -> List[int]:
    """Experts with a positive count, the largest count first (ties: the lower id).

    Args:
        counts: tokens (or token rows) per expert, [E] host ints.
    """
    return sorted((e for e, n in enumerate(counts) if n > 0), key=lambda e: (-counts[e], e))


def next_in_stack(names: Sequence[str]) -> Dict[str, Optional[str]]:
    """For each MoE layer name (model order, as :func:`moe_layers` gives them), the next MoE layer
    of the same stack (the name before ``.layers.``: ``encoder`` / ``decoder``), or None for the last."""
    out: Dict[str, Optional[str]] = {}
    last: Dict[str, str] = {}
    for name in names:
        stack = name.split(".layers.")[0]
        if stack in last:
            out[last[stack]] = name
        out[name] = None
        last[stack] = name
    return out


class ExpertPredictor:
    """Base class: attached to the MoE layers of ``model`` (forward hooks); :meth:`remove` detaches it.

    Args:
        model: a module holding :class:`~fairseq_moe_infer.moe.MoELayer` modules whose experts
            have an :class:`~fairseq_moe_infer.moe.buffered.ExpertBuffer` (layers without one are
            never prefetched).
    """

    name = ""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model, named=True)
        self._handles = []

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @staticmethod
    def _prefetch(layer, experts: List[int]) -> int:
        buf = layer.experts.buffer
        if buf is None or not buf.ready or not experts:
            return 0
        return buf.prefetch(experts)


@register_predictor("none")
class NoPrefetch(ExpertPredictor):
    """No prefetching: misses are copied in when a call needs them (the paper's buffering)."""


@register_predictor("previous-step")
class PreviousStep(ExpertPredictor):
    """After each evaluation call of a layer, prefetch the K experts of that call with the most rows."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        for _, m in self.layers:
            self._handles.append(m.register_forward_hook(self._after))

    @staticmethod
    def predict(last_rows: Sequence[int], slots: int) -> List[int]:
        """The prediction from the last call's token rows per local expert: the ``slots`` busiest
        (most rows first, ties: the lower id)."""
        return ranked_experts(last_rows)[:slots]

    def _after(self, layer, args, out):
        buf = layer.experts.buffer
        if not layer.training and buf is not None:
            self._prefetch(layer, self.predict(buf.last_rows, buf.num_slots))


@register_predictor("gate")
class NextLayerGate(ExpertPredictor):
    """Prefetch the next MoE layer's experts chosen by its gate on this layer's hidden states."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        by_name = dict(self.layers)
        nxt = next_in_stack([n for n, _ in self.layers])
        self._pending: Dict[int, tuple] = {}
        self._host: Dict[int, torch.Tensor] = {}
        self._index: Dict[tuple, torch.Tensor] = {}
        for name, m in self.layers:
            if nxt[name] is not None:
                target = by_name[nxt[name]]
                self._handles.append(m.gate.register_forward_hook(self._on_routing(id(m), target)))
                self._handles.append(m.register_forward_hook(self._after(target)))

    def predict_counts(self, target, x: torch.Tensor, nonpad: torch.Tensor) -> torch.Tensor:
        """Predicted token choices per local expert of ``target`` (an :class:`MoELayer`).

        Args:
            x: [T, d] hidden states (the current layer's MoE input).
            nonpad: [T] bool, the tokens to count (non-padding).

        Returns:
            [E_local] int64 on x's device: top-k choices of ``target``'s gate per local expert
            (its placement's logical expert of each local slot).
        """
        choices = target.gate.predict_experts(x)[nonpad].reshape(-1)
        counts = torch.bincount(choices, minlength=target.num_experts)
        key = (id(target), x.device)
        if key not in self._index:
            self._index[key] = torch.tensor(target.experts.expert_index, dtype=torch.long, device=x.device)
        return counts[self._index[key]]

    def _on_routing(self, key: int, target):
        def hook(gate, args, routing):
            if gate.training or target.experts.buffer is None:
                return
            counts = self.predict_counts(target, args[0], routing.valid[:, 0])
            if counts.is_cuda:  # to the host behind this layer's routing (its store syncs on it anyway)
                host = self._host.get(key)
                if host is None or host.shape != counts.shape:
                    host = self._host[key] = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
                host.copy_(counts, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                self._pending[key] = (host, done)
            else:
                self._pending[key] = (counts, None)

        return hook

    def _after(self, target):
        def hook(layer, args, out):
            pending = self._pending.pop(id(layer), None)
            if pending is None:
                return
            counts, done = pending
            if done is not None:
                done.synchronize()  # already passed: recorded before this layer's own routing sync
            self._prefetch(target, ranked_experts(counts.tolist()))

        return hook


def build_predictor(name: str, model: nn.Module) -> ExpertPredictor:
    """Attach predictor ``name`` (``--moe-prefetch``) to the MoE layers of ``model``.

    Raises:
        MoEConfigError: unknown name.
    """
    if name not in PREDICTORS:
        raise MoEConfigError(f"unknown --moe-prefetch '{name}'; choose one of {', '.join(sorted(PREDICTORS))}")
    return PREDICTORS[name](model)
