"""CUDA graphs of the MoE layer per token-count bucket (``--moe-cuda-graph-max-tokens N``).

At small batches the dynamic layer is bound by the host: about 15 kernel launches (gate, sort,
counts, gather, two grouped GEMMs, the fused epilogues, the combine) for a few dozen tokens per
decoding step. Captured in a CUDA graph the same work is one launch (the layer alone, E=64,
d=1024, f=4096, 512 tokens on the H200: 1.89 ms eager, 0.56 ms replayed; README, "The MoE layer
alone"). A graph has fixed shapes, so :class:`LayerGraphs` keeps one graph per power-of-two
token count up to N ("bucket", as vLLM and TensorRT-LLM capture decoding per batch size): a call
of T tokens is padded to the next bucket B >= T, the B - T padding rows carry the padding mask
(routed nowhere, output zero, not counted: the gate's ``--use-moe-pad-mask`` semantics), the
graph is replayed and the first T output rows are returned.

What is captured is the routing and the dispatch only (:meth:`MoELayer.route_and_dispatch`:
gate, placement, dispatcher, experts); the layer's bookkeeping (counters, per-GPU loads) runs
eagerly on the graph's outputs, so the run summary is the same as without graphs. Capturing needs
a path that never reads a value back to the host: one CUDA device, dynamic gating, every expert
resident. :func:`check_graphable` refuses the rest (static gating: its capacity follows T, so
padding would change it; expert parallelism: the all-to-all splits are read on the host; expert
buffering: the store decides copies on the host; routing traces and prefetching: their hooks on
the gate run only at capture).

Outputs: the padding rows change nothing in the real rows' routing or expert computation, but
the gate and expert GEMMs then run with B instead of T rows, and cuBLAS may pick another kernel
for another row count, so results equal the eager layer's to float rounding (bit-identical where
the kernels are the same; the GPU tests compare both).
"""

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .gate import MoEConfigError


def graph_conflict(gating: str, expert_parallel: bool = False, buffered: bool = False,
                   recording: bool = False) -> Optional[str]:
    """The one line refusing ``--moe-cuda-graph-max-tokens`` with these settings (see the module
    docstring), or None where the layer can be captured. Used at the start of a tool (the task's
    options, :func:`~fairseq_moe_infer.inference.validate_inference_options`) and on each layer
    (:func:`check_graphable`)."""
    if gating != "dynamic":
        return ("--moe-cuda-graph-max-tokens needs --moe-gating dynamic (static gating's capacity follows the "
                "batch's token count, which the graph's padding would change)")
    if expert_parallel:
        return ("--moe-cuda-graph-max-tokens runs on one GPU: expert parallelism reads the all-to-all splits on the "
                "host; drop the flag or run one process")
    if buffered:
        return ("--moe-cuda-graph-max-tokens needs every expert resident: drop --moe-expert-buffer-size (expert "
                "buffering decides its copies on the host) or the graph flag")
    if recording:
        return ("--moe-record-trace reads every call's routing on the host, which a replayed CUDA graph skips: drop "
                "--moe-cuda-graph-max-tokens while recording")
    return None


def check_graphable(layer) -> None:
    """Raise :class:`MoEConfigError` naming the flag to drop where ``layer`` cannot be captured
    (:func:`graph_conflict`)."""
    problem = graph_conflict(layer.dispatcher.name, layer.group is not None, layer.experts.buffer is not None)
    if problem:
        raise MoEConfigError(problem)


def _refuse_off_gpu() -> None:
    from ..cli import exit_with_error, in_fairseq_tool

    problem = "--moe-cuda-graph-max-tokens captures CUDA graphs: run on a GPU (drop --cpu) or drop the flag"
    if in_fairseq_tool():
        exit_with_error(problem)
    raise MoEConfigError(problem)


def bucket_of(num_tokens: int) -> int:
    """The smallest power of two >= ``num_tokens`` (>= 1)."""
    return 1 << max(0, (int(num_tokens) - 1).bit_length())


class LayerGraphs:
    """One MoE layer's CUDA graphs, one per power-of-two token count up to ``max_tokens``.

    Args:
        max_tokens: calls with more tokens run eagerly (``--moe-cuda-graph-max-tokens``, >= 1).
        capture: False runs the padded computation eagerly instead of capturing it (the CPU tests
            check the padding, masking and bookkeeping with it; the tools always capture).
        pool: CUDA graph memory pool shared with other layers' graphs (they replay one at a time
            and each call's outputs are copied out before the next replay).

    Raises:
        MoEConfigError: ``max_tokens`` < 1.
    """

    def __init__(self, max_tokens: int, capture: bool = True, pool=None):
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise MoEConfigError(f"--moe-cuda-graph-max-tokens must be an integer >= 1, got {max_tokens}")
        self.max_tokens, self.capture, self.pool = max_tokens, capture, pool
        self._graphs: Dict[tuple, tuple] = {}  # (bucket, dtype, device) -> (graph or None, x, mask, n, outputs)
        self._weights_state: tuple = ()
        self.replays = 0
        self.eager_calls = 0

    def applies(self, tokens: Tensor, training: bool) -> bool:
        """Whether a call with ``tokens`` [T, d] runs from a graph (inference, gradients off, T <= max).

        Raises:
            MoEConfigError: an inference call of any size off a CUDA device while capturing (in a
                fairseq tool: one error line and exit), so that ``--cpu`` is refused even where every
                call has more than ``max_tokens`` tokens (fairseq-eval-lm).
        """
        if training or torch.is_grad_enabled():
            return False
        if self.capture and tokens.device.type != "cuda":
            _refuse_off_gpu()
        return 0 < tokens.shape[0] <= self.max_tokens

    @property
    def buckets(self) -> list:
        """The token counts captured so far."""
        return sorted({key[0] for key in self._graphs})

    def run(self, fn: Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, ...]], tokens: Tensor,
            mask: Optional[Tensor], weights: Tuple[Tensor, ...] = ()) -> Tuple[Tensor, ...]:
        """``fn(tokens, mask)`` for ``tokens`` [T, d] and ``mask`` [T] bool (True = padding) or None,
        computed at the bucket size B >= T from a captured graph as ``fn(x, pad, n)``: ``x`` [B, d]
        (the call's rows first), ``pad`` [B] bool (rows T.. masked), ``n`` a scalar int64 tensor = T
        (for what must not average over the bucket's rows, e.g. the gate's balancing loss).

        ``fn`` must return a tuple of tensors whose first is [B, ...] (rows per token); the rest
        (counters) are returned whole. All outputs are copies, safe to keep across calls.
        ``weights``: the tensors ``fn`` reads (the layer's parameters); a graph replays the addresses
        it captured, so when any was replaced since (``model.half()``, ``.to(device)``: new storage,
        the old one freed) every graph is dropped and captured again.

        Raises:
            MoEConfigError: ``tokens`` not on a CUDA device while capturing (the flag needs a GPU).
        """
        state = tuple((w.data_ptr(), w.dtype, w.device) for w in weights)
        if state != self._weights_state:
            self._graphs.clear()
            self._weights_state = state
        T = tokens.shape[0]
        B = bucket_of(T)
        key = (B, tokens.dtype, tokens.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._build(fn, B, tokens)
        graph, x, pad, n, outs = entry
        x[:T].copy_(tokens)
        n.fill_(T)
        if mask is None:
            pad[:T].zero_()
        else:
            pad[:T].copy_(mask)
        pad[T:].fill_(True)  # an earlier, longer call of this bucket unmasked some of these rows
        if graph is None:
            outs = fn(x, pad, n)
            self.eager_calls += 1
        else:
            graph.replay()
            self.replays += 1
        return (outs[0][:T].clone(),) + tuple(o.clone() for o in outs[1:])

    def _build(self, fn, B: int, like: Tensor) -> tuple:
        x = torch.zeros(B, like.shape[1], dtype=like.dtype, device=like.device)
        pad = torch.ones(B, dtype=torch.bool, device=like.device)  # True = padding
        n = torch.full((), B, dtype=torch.long, device=like.device)  # the call's row count, set before each replay
        if not self.capture:
            return None, x, pad, n, None
        if like.device.type != "cuda":
            _refuse_off_gpu()
        side = torch.cuda.Stream(like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (Triton compiles, cuBLAS workspaces)
            fn(x, pad, n)
        torch.cuda.current_stream(like.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outs = fn(x, pad, n)
        return graph, x, pad, n, outs

    def __repr__(self) -> str:
        return f"LayerGraphs(max_tokens={self.max_tokens}, buckets={self.buckets}, replays={self.replays})"
