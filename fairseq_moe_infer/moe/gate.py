"""Top-k gating (top-1 Switch / top-2 GShard) as in fairseq's MoE branch.

The gate only *routes*: it picks experts and their gate probabilities. Whether a
choice is later dropped for lack of capacity is the dispatcher's business
(:mod:`fairseq_moe_infer.moe.dispatch`), which hands back a ``kept`` mask; the
gate then turns probabilities into combine weights with
:meth:`Routing.combine_weights`, following fairseq's normalisation rules.

Semantics follow ``fairseq/modules/moe/top1gate.py`` and ``top2gate.py``
(GShard, Lepikhin et al. 2020, Sec. 2.2; Switch, Fedus et al. 2021):

* gate probabilities are ``softmax(x @ Wg)`` over the E experts (in float32
  with ``use_fp32``);
* top-1: the arg-max expert, combine weight = its probability (not renormalised);
* top-2: the arg-max expert, then the arg-max of the remaining logits, with
  Gumbel noise added under the ``sampling`` second-expert policy; under the
  ``random`` policy the second expert is kept with probability ``2 * p2``;
  the two weights are renormalised to sum to one, after capacity dropping
  (fairseq's default) or before it (``normalize_before_dropping``);
* the balancing loss is ``E * E * mean_e(me_e * ce_e)`` where ``me`` is the mean
  gate probability and ``ce`` the fraction of tokens whose *first* choice is
  expert e (padding tokens count in the denominator, as in fairseq).

One deliberate difference: fairseq also applies the stochastic second-expert
policies (Gumbel noise, random dropping) in evaluation mode. Here they apply
only in training, so that inference is deterministic and static and dynamic
gating can be compared token for token; with ``second_expert_policy="all"``
both behave identically.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .options import SECOND_EXPERT_POLICIES, MoEConfigError, check_moe_options  # noqa: F401 (re-exported)


@dataclass
class Routing:
    """The routing decision of a top-k gate for T tokens.

    Attributes:
        expert_indices: [T, k] int64, expert chosen by each token, first choice
            in column 0.
        probs: [T, k] float32 (or the logits' dtype without fp32 gating), gate
            probability of each choice; already renormalised over the k choices
            when ``normalize_before_dropping``.
        valid: [T, k] bool, False for padding tokens and for second choices
            removed by the ``random`` policy.
        l_aux: scalar tensor, the balancing loss.
        num_experts: E.
        renormalize_after_dropping: whether :meth:`combine_weights`
            renormalises the kept weights of each token to sum to one.
    """

    expert_indices: Tensor
    probs: Tensor
    valid: Tensor
    l_aux: Tensor
    num_experts: int
    renormalize_after_dropping: bool

    @property
    def k(self) -> int:
        return self.expert_indices.shape[1]

    def combine_weights(self, kept: Tensor) -> Tensor:
        """Combine weights [T, k] (probs' dtype) given the kept mask [T, k] bool.

        A dropped or invalid choice gets weight 0. For top-2 with fairseq's
        default, the kept probabilities are renormalised to sum to one
        (``gates1_s /= denom_s`` in fairseq), with the denominator clamped at
        the dtype's eps so a token with both choices dropped gets zeros.
        """
        w = self.probs * kept.to(self.probs.dtype)
        if self.renormalize_after_dropping:
            denom = w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(w.dtype).eps)
            w = w / denom
        return w


class TopKGate(nn.Module):
    """Linear gate ``Wg: [E, d]`` (no bias) followed by top-1 or top-2 routing.

    Args:
        model_dim: d, the token width.
        num_experts: E (>= k).
        k: 1 or 2.
        use_fp32: compute logits and softmax in float32 (``--moe-gating-use-fp32``).
        second_expert_policy: ``sampling`` | ``all`` | ``random`` (top-2 only).
        normalize_before_dropping: renormalise top-2 probabilities before
            capacity dropping (``--moe-normalize-gate-prob-before-dropping``).

    Raises:
        MoEConfigError: k not in {1, 2}, E < k, or an unknown policy.
    """

    def __init__(
        self,
        model_dim: int,
        num_experts: int,
        k: int = 2,
        use_fp32: bool = False,
        second_expert_policy: str = "sampling",
        normalize_before_dropping: bool = False,
    ):
        super().__init__()
        check_moe_options(k=k, moe_expert_count=num_experts, moe_second_expert_policy=second_expert_policy)
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.k = k
        self.use_fp32 = use_fp32
        self.second_expert_policy = second_expert_policy
        self.normalize_before_dropping = normalize_before_dropping

    def predict_experts(self, x: Tensor) -> Tensor:
        """The experts this gate would choose for ``x`` in evaluation mode: the top-k of its logits
        (computed as :meth:`forward` does; exact ties may break differently). No balancing loss, no
        module hooks: the ``gate`` prefetch predictor (:mod:`fairseq_moe_infer.moe.prefetch`) applies
        a later layer's gate to an earlier hidden state with it.

        Args:
            x: [T, d] tokens.

        Returns:
            [T, k] int64 expert ids, the first choice in column 0.
        """
        if self.use_fp32:
            logits = F.linear(x.float(), self.wg.weight.float())
        else:
            logits = F.linear(x, self.wg.weight)
        return logits.topk(self.k, dim=1).indices

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, num_rows: Optional[Tensor] = None) -> Routing:
        """Route tokens.

        Args:
            x: [T, d] tokens (any float dtype).
            padding_mask: [T] bool, True where the token is padding (routed
                nowhere, output zero), or None.
            num_rows: scalar int64 tensor n <= T or None (= T): only the first n rows are the call's
                tokens, the rest a CUDA graph's bucket padding (:mod:`~fairseq_moe_infer.moe.graphs`,
                also masked by ``padding_mask``), left out of the balancing loss's means.

        Returns:
            :class:`Routing` for the T tokens.
        """
        if self.use_fp32:
            logits = F.linear(x.float(), self.wg.weight.float())
        else:
            logits = self.wg(x)
        gates = F.softmax(logits, dim=1)
        num_tokens, num_experts = gates.shape

        idx1 = gates.argmax(dim=1)
        nonpad = (
            torch.ones(num_tokens, dtype=torch.bool, device=x.device)
            if padding_mask is None
            else ~padding_mask.reshape(-1)
        )
        p1 = gates.gather(1, idx1[:, None])[:, 0]
        # balancing loss (GShard): first choices of non-padding tokens, mean over all
        if num_rows is None:
            me = gates.mean(dim=0)
            rows = num_tokens
        else:  # a graph bucket: the call's n rows only (the loss of the eager call, to rounding)
            rows = num_rows.to(gates.dtype)
            live = torch.arange(num_tokens, device=x.device) < num_rows
            me = (gates * live[:, None].to(gates.dtype)).sum(dim=0) / rows
        ce = torch.zeros_like(me).index_add_(0, idx1, nonpad.to(me.dtype)) / rows
        l_aux = (me * ce).mean() * num_experts * num_experts

        if self.k == 1:
            return Routing(idx1[:, None], p1[:, None], nonpad[:, None], l_aux, num_experts, False)

        noisy = logits
        if self.training and self.second_expert_policy == "sampling":
            noisy = logits + _gumbel_like(logits)
        idx2 = noisy.scatter(1, idx1[:, None], float("-inf")).argmax(dim=1)
        p2 = gates.gather(1, idx2[:, None])[:, 0]
        if self.normalize_before_dropping:
            denom = (p1 + p2).clamp(min=torch.finfo(p1.dtype).eps)
            p1, p2 = p1 / denom, p2 / denom
        valid2 = nonpad
        if self.training and self.second_expert_policy == "random":
            valid2 = nonpad & (2 * p2 > torch.rand_like(p2))
        return Routing(
            torch.stack([idx1, idx2], dim=1),
            torch.stack([p1, p2], dim=1),
            torch.stack([nonpad, valid2], dim=1),
            l_aux,
            num_experts,
            not self.normalize_before_dropping,
        )


def _gumbel_like(t: Tensor) -> Tensor:
    """Standard Gumbel(0, 1) samples shaped like ``t`` (the Gumbel-max trick)."""
    u = torch.rand_like(t).clamp_(min=torch.finfo(t.dtype).tiny, max=1.0 - 1e-7)
    return -torch.log(-torch.log(u))
