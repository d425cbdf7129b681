"""Expert feed-forward networks, stored stacked so they run as one grouped GEMM.

Each expert is fairseq's transformer FFN ``fc2(dropout(act(fc1(x))))`` with
``fc1: d -> f`` and ``fc2: f -> d``. The E_local experts of this rank are kept as
stacked parameters in ``nn.Linear`` layout:

* ``fc1_weight`` [E_local, f, d], ``fc1_bias`` [E_local, f]
* ``fc2_weight`` [E_local, d, f], ``fc2_bias`` [E_local, d]

Every expert parameter carries ``param.expert = True`` (fairseq MoE's marker)
so that data-parallel code can leave it out of gradient all-reduce and
checkpoint code can shard it per rank.

State dicts saved by fairseq's MoE branch, with one module per expert
(``experts.{i}.fc1.weight``), are converted on load by
:meth:`Experts._load_from_state_dict`; from a full stack of E experts each local
slot takes its logical expert's weights (``expert_index``: by default this rank's
contiguous range ``[rank * E_local, (rank + 1) * E_local)``; under an expert
placement, :mod:`~fairseq_moe_infer.moe.placement`, any experts, replicas included).
"""

import math
import re
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor, nn

from .gate import MoEConfigError
from .kernels import FUSED_GEMM_MAX_ROWS_PER_GROUP, bias_act_rows_, fused_available, grouped_linear_bias_act

EXPERT_PARAMS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
_FAIRSEQ_KEY = re.compile(r"^(\d+)\.(fc1|fc2)\.(weight|bias)$")
EXPERT_KEY_PART = ".moe_layer.experts."


def is_expert_key(key: str) -> bool:
    """Whether a state-dict key names expert weights: this plugin's stacked
    ``...moe_layer.experts.fc1_weight`` [E, f, d] or fairseq MoE's per-expert
    ``...moe_layer.experts.{i}.fc1.weight``. The one place that recognises expert keys
    (checkpoint export / conversion and tests use it; a built model marks its expert
    parameters with :func:`is_expert_param`)."""
    return EXPERT_KEY_PART in key


def is_expert_param(p) -> bool:
    """Whether parameter ``p`` is a (sharded) expert tensor: fairseq MoE's ``p.expert`` marker,
    which fairseq's legacy DDP all-reduce and gradient-norm code also read."""
    return bool(getattr(p, "expert", False))


def gather_expert_stack(t: Tensor, group) -> Optional[Tensor]:
    """Concatenate the ranks' [E_local, ...] shares of an expert stack on rank 0 of ``group``
    (a collective: every rank calls it with the same shape and dtype).

    Returns:
        rank 0: the [E, ...] stack in CPU memory, rank r's share at rows
        ``[r * E_local, (r + 1) * E_local)``; other ranks: None.
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(world)] if rank == 0 else None
    dist.gather(t, parts, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return torch.cat([x.cpu() for x in parts]) if rank == 0 else None


def grouped_gemm_available(x: Tensor) -> bool:
    """True where ``torch._grouped_mm`` runs: CUDA, compute capability >= 9.0, bf16 or fp16
    (fp16 checked on the H200 with torch 2.11: forward and backward, tests/test_gpu.py)."""
    return (
        x.is_cuda
        and hasattr(torch, "_grouped_mm")
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class Experts(nn.Module):
    """The E_local feed-forward experts held by this rank.

    Args:
        model_dim: d.
        ffn_dim: f, hidden width of each expert.
        num_local_experts: E_local.
        activation_fn: fairseq activation name (``relu``, ``gelu``, ...).
        activation_dropout: dropout after the activation (training only).
        num_global_experts: E, the experts of all ranks (defaults to E_local).
        global_offset: index of this rank's first expert among all E experts.
        expert_index: the logical expert (in ``[0, E)``) held by each of the E_local slots;
            defaults to ``global_offset + i`` (contiguous sharding). Replicas repeat an id.
    """

    def __init__(
        self,
        model_dim: int,
        ffn_dim: int,
        num_local_experts: int,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
        num_global_experts: int = 0,
        global_offset: int = 0,
        expert_index: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        self.model_dim, self.ffn_dim = model_dim, ffn_dim
        self.num_local_experts = num_local_experts
        self.num_global_experts = num_global_experts or num_local_experts
        self.global_offset = global_offset
        self.expert_index = (
            [int(i) for i in expert_index] if expert_index is not None
            else list(range(global_offset, global_offset + num_local_experts))
        )
        if len(self.expert_index) != num_local_experts:
            raise MoEConfigError(f"expert_index lists {len(self.expert_index)} experts for {num_local_experts} slots")
        self.activation_name = activation_fn
        self.activation_fn = utils.get_activation_fn(activation_fn)
        self.activation_dropout = FairseqDropout(activation_dropout, module_name="Experts")
        e = num_local_experts
        self.fc1_weight = nn.Parameter(torch.empty(e, ffn_dim, model_dim))
        self.fc1_bias = nn.Parameter(torch.empty(e, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.empty(e, model_dim, ffn_dim))
        self.fc2_bias = nn.Parameter(torch.empty(e, model_dim))
        for name in EXPERT_PARAMS:
            getattr(self, name).expert = True  # read by is_expert_param and by fairseq
        self.buffer = None  # the resident store; set_buffer() for the buffered one
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

        One seed is drawn from the global RNG (the same draw on every rank, as
        fairseq seeds all ranks alike); global expert ``j`` is then drawn from a
        generator seeded ``seed + j``. So a rank holding experts
        ``expert_index`` (replicas included) gets exactly those experts of
        the single-process model, without drawing the others.
        """
        seed = int(torch.randint(0, 2**62, (1,), device="cpu"))  # CPU even under ``with torch.device("meta")``
        if self.fc1_weight.is_meta:  # built on the meta device: nothing to fill yet
            return
        for i in range(self.num_local_experts):
            g = torch.Generator().manual_seed(seed + self.expert_index[i])
            for w, b in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
                bound = 1.0 / math.sqrt(w.shape[-1])
                with torch.no_grad():
                    w[i].copy_(torch.empty(w.shape[1:]).uniform_(-bound, bound, generator=g))
                    b[i].copy_(torch.empty(b.shape[1:]).uniform_(-bound, bound, generator=g))

    def _dropout_off_at_inference(self) -> bool:
        """False under fairseq's ``--retain-dropout`` (activation dropout kept at inference)."""
        d = self.activation_dropout
        return d.p == 0 or not getattr(d, "apply_during_inference", False)

    def _hidden(self, h: Tensor) -> Tensor:
        return self.activation_dropout(self.activation_fn(h))

    # ---- the expert store: all resident (the parameters) or buffered (moe/buffered.py) ----
    def set_buffer(self, buffer) -> None:
        """Serve evaluation forwards through ``buffer`` (an
        :class:`~fairseq_moe_infer.moe.buffered.ExpertBuffer`, ``--moe-expert-buffer-size``) or,
        with None, from the resident parameters. The dispatchers call the same methods either way."""
        self.buffer = buffer

    def _buffered(self, x: Tensor) -> bool:
        buffer = getattr(self, "buffer", None)
        if buffer is None:
            return False
        if self.training:
            raise MoEConfigError("--moe-expert-buffer-size is for inference (fairseq-generate, fairseq-interactive, "
                                 "fairseq-eval-lm); drop it when training")
        if not buffer.ready:
            buffer.materialize([getattr(self, n) for n in EXPERT_PARAMS], x.device)
        return True

    def forward_padded(self, x: Tensor) -> Tensor:
        """Static-capacity path: [E_local, C, d] -> [E_local, C, d] with batched matmuls."""
        if self._buffered(x):
            return self.buffer.forward_padded(self, x)
        h = torch.baddbmm(self.fc1_bias[:, None, :], x, self.fc1_weight.transpose(1, 2))
        return torch.baddbmm(self.fc2_bias[:, None, :], self._hidden(h), self.fc2_weight.transpose(1, 2))

    def forward_grouped(self, x: Tensor, counts: Tensor, expert_of_row: Tensor) -> Tensor:
        """Dynamic path: rows of ``x`` grouped by expert, exact sizes.

        Args:
            x: [N, d], rows sorted by local expert; rows past ``counts.sum()``
                (unrouted assignments) are ignored and their output is zero.
            counts: [E_local] int64 rows per expert (on x's device).
            expert_of_row: [N] int64 local expert of each row (E_local for ignored rows).

        Returns:
            [N, d] expert outputs.

        On Hopper in bf16/fp16 both GEMMs are one ``torch._grouped_mm`` each;
        elsewhere a loop of per-expert ``F.linear`` over the host-side counts
        (one device sync) computes the same function.
        """
        if self._buffered(x):
            return self.buffer.forward_grouped(self, x, counts, expert_of_row)
        if grouped_gemm_available(x):
            return self._grouped_mm([getattr(self, n) for n in EXPERT_PARAMS], x, counts, expert_of_row)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows = x[start : start + n]
                h = F.linear(rows, self.fc1_weight[e], self.fc1_bias[e])
                out[start : start + n] = F.linear(self._hidden(h), self.fc2_weight[e], self.fc2_bias[e])
                start += n
        return out

    def _grouped_mm(self, params, x: Tensor, counts: Tensor, expert_of_row: Tensor) -> Tensor:
        """Both grouped GEMMs over the stacks ``params`` = (fc1_weight, fc1_bias, fc2_weight, fc2_bias),
        [G, ...] each (the E_local parameters, or a buffer's K slots); ``counts`` [G] rows per group."""
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = params
        groups = fc1_weight.shape[0]
        fused = not self.training and self._dropout_off_at_inference() and fused_available(x, self.activation_name)
        if fused and torch.cuda.is_current_stream_capturing() and (
                x.dtype == torch.float16 or x.shape[0] <= FUSED_GEMM_MAX_ROWS_PER_GROUP * groups):
            # Inside a CUDA graph (--moe-cuda-graph-max-tokens), small groups (decoding steps) run one
            # Triton grouped GEMM per expert matmul with the bias and activation in its epilogue: on
            # the GPU alone it is as fast or faster there (kernels.FUSED_GEMM_MAX_ROWS_PER_GROUP), which
            # counts once the graph removes the launches. fp16 always: torch._grouped_mm in fp16 copied
            # between host and device under capture (torch 2.11). Eager calls keep torch._grouped_mm,
            # so eager results (and the buffered store's, equal to them bit for bit) do not change.
            h = grouped_linear_bias_act(x, fc1_weight, fc1_bias, counts, self.activation_name)
            return grouped_linear_bias_act(h, fc2_weight, fc2_bias, counts, "identity")
        offs = counts.cumsum(0).to(torch.int32)  # torch._grouped_mm's group ends (the Triton kernel reads counts)
        w1, w2 = fc1_weight.transpose(1, 2), fc2_weight.transpose(1, 2)
        if fused:
            # inference: bias + activation (+ zeroing of unrouted rows) fused into one pass per GEMM
            h = bias_act_rows_(torch._grouped_mm(x, w1, offs=offs), fc1_bias, expert_of_row, self.activation_name)
            return bias_act_rows_(torch._grouped_mm(h, w2, offs=offs), fc2_bias, expert_of_row, "identity")
        # Rows past the last group are not computed by _grouped_mm (forward or backward): they hold
        # garbage. torch.where (not a multiply: garbage may be NaN) zeroes them and their gradients.
        row_ok = (expert_of_row < groups)[:, None]
        e = expert_of_row.clamp(max=groups - 1)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        h = torch._grouped_mm(torch.where(row_ok, x, zero), w1, offs=offs)
        h = self._hidden(torch.where(row_ok, h + fc1_bias[e], zero))
        y = torch._grouped_mm(h, w2, offs=offs)
        return torch.where(row_ok, y + fc2_bias[e], zero)

    # ---- checkpoint compatibility -------------------------------------------------
    def gather_for_save(self, group) -> None:
        """Collect all E experts on rank 0 of the expert-parallel ``group`` (a collective: every
        rank calls it), one tensor at a time and into CPU memory, so that rank 0's next
        ``state_dict()`` holds the full [E, ...] stacks, loadable by any world size. Other ranks
        only send. :meth:`release_gathered` drops the copies.

        Raises:
            MoEConfigError: a placement map other than the contiguous sharding (``--moe-placement``).
        """
        import torch.distributed as dist

        rank = dist.get_rank(group)
        if self.expert_index != list(range(rank * self.num_local_experts, (rank + 1) * self.num_local_experts)):
            raise MoEConfigError("saving a checkpoint needs the contiguous expert sharding; drop --moe-placement")
        gathered = {name: gather_expert_stack(getattr(self, name), group) for name in EXPERT_PARAMS}
        self._gathered = None if gathered[EXPERT_PARAMS[0]] is None else gathered

    def local_share(self, key: str, t: Tensor) -> Tensor:
        """This rank's share of an expert stack ``t`` (weights, an EMA copy, optimizer moments).

        Args:
            key: the tensor's name, for the error message.
            t: [E, ...] (all experts: the rows of ``expert_index``, this rank's slots, are
                returned) or [E_local, ...] (returned as is).

        Raises:
            MoEConfigError: any other leading size.
        """
        have = self.num_local_experts
        if t.shape[0] == self.num_global_experts and self.expert_index != list(range(t.shape[0])):
            return t[self.expert_index]  # each slot's logical expert (a copy per replica; contiguous: a slice)
        if t.shape[0] != have:
            raise MoEConfigError(
                f"{key}: the checkpoint holds {t.shape[0]} experts but the model was built "
                f"with {self.num_global_experts} (--moe-expert-count {self.num_global_experts}); "
                f"train with --moe-expert-count {t.shape[0]}, or when evaluating drop the "
                f"moe_expert_count of --model-overrides, or load a checkpoint with "
                f"{self.num_global_experts} experts"
            )
        return t

    def release_gathered(self) -> None:
        """Forget the copies made by :meth:`gather_for_save`."""
        self._gathered = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in (getattr(self, "_gathered", None) or {}).items():
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        stack_per_expert_keys(state_dict, prefix)
        for name in EXPERT_PARAMS:
            key = prefix + name
            if key not in state_dict:
                continue
            state_dict[key] = self.local_share(key, state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def stack_per_expert_keys(state_dict, prefix: str) -> None:
    """Rewrite ``{prefix}{i}.fc1.weight`` etc. (fairseq MoE: one FFN module per expert) into
    stacked ``{prefix}fc1_weight`` [E, f, d] tensors, in place.

    Raises:
        RuntimeError: the expert indices under ``prefix`` are not 0..E-1.
    """
    found = {}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        m = _FAIRSEQ_KEY.match(key[len(prefix) :])
        if m:
            found.setdefault(f"{m.group(2)}_{m.group(3)}", {})[int(m.group(1))] = state_dict.pop(key)
    for name, per_expert in found.items():
        order: List[int] = sorted(per_expert)
        if order != list(range(len(order))):
            raise RuntimeError(f"{prefix}: expert indices {order} are not 0..{len(order) - 1}")
        state_dict[prefix + name] = torch.stack([per_expert[i] for i in order])
