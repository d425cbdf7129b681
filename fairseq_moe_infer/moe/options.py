"""The one validation path for every ``--moe-*`` option (model, task and criterion flags).

:func:`check_moe_options` is called by the gate, the dispatcher, the model options
(``validate_moe_args``), the task options (``validate_inference_options``) and the
criterions, each with the values it receives, so a rule is written once: numbers must be
finite (no NaN, no inf) and in the range below, names must be known.

Ranges (reasons): ``moe_capacity_factor`` in (0, 64] (training capacity
``int(factor * k * ceil(T / E))``; beyond E / k every expert already holds all T tokens);
``moe_eval_capacity_token_fraction`` in [0, 1] (capacity ``ceil(fraction * T)``; 1.0 already
drops nothing; 0 = the training rule); counts are integers (``moe_expert_count`` >= 1,
``moe_freq`` / ``moe_expert_ffn_dim`` / ``moe_expert_buffer_size`` /
``moe_cuda_graph_max_tokens`` >= 0); ``moe_gate_loss_wt`` in [0, 1000].
``moe_prefetch`` (a registered predictor) other than ``none`` and ``moe_cpu_experts auto`` need
expert buffering (``moe_expert_buffer_size`` >= 1).
"""

import math
from numbers import Real

SECOND_EXPERT_POLICIES = ("sampling", "all", "random")
CPU_EXPERT_MODES = ("off", "auto")


class MoEConfigError(ValueError):
    """An invalid MoE option; the message names the flag and the fix."""


# name: (low, high, low inclusive, kind, hint)
NUMERIC_RULES = {
    "moe_capacity_factor": (0.0, 64.0, False, float, "fairseq's default is 1.0"),
    "moe_eval_capacity_token_fraction": (
        0.0, 1.0, True, float, "0 = the training capacity factor; 1.0 drops nothing; or use --moe-gating dynamic"),
    "moe_gate_loss_wt": (0.0, 1000.0, True, float, "fairseq's default is 0.01"),
    "moe_expert_count": (1, 1 << 20, True, int, "experts per MoE layer"),
    "moe_freq": (0, 1 << 20, True, int, "0 = dense"),
    "moe_expert_ffn_dim": (0, 1 << 24, True, int, "0 = the FFN width"),
    "moe_expert_buffer_size": (0, 1 << 20, True, int, "GPU slots per MoE layer; 0 = all experts resident"),
    "moe_collective_timeout": (0.0, 1e7, True, float, "seconds; 0 = torch's process-group default"),
    "moe_cuda_graph_max_tokens": (0, 1 << 20, True, int, "0 = off; calls of at most N tokens replay CUDA graphs"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_moe_options(**values) -> None:
    """Check the given MoE options (keyword = option name, e.g. ``moe_capacity_factor=1.0``).

    Known names: those of :data:`NUMERIC_RULES`, ``moe_gating`` (a registered dispatcher),
    ``moe_second_expert_policy``,
    ``moe_buffer_policy`` (a registered eviction policy), ``moe_prefetch`` (a registered prefetch
    predictor), ``moe_cpu_experts`` (``off`` / ``auto``; these two, when on and given with
    ``moe_expert_buffer_size``, need it >= 1), ``k`` (1 or 2, with ``moe_expert_count`` >= k). Unknown
    names are ignored; None values are skipped.

    Raises:
        MoEConfigError: one line naming the flag, the value and the valid range.
    """
    for name, value in values.items():
        rule = NUMERIC_RULES.get(name)
        if rule is None or value is None:
            continue
        low, high, low_ok, kind, hint = rule
        is_number = isinstance(value, Real) and not isinstance(value, bool)
        bad_kind = not is_number or not math.isfinite(value) or (kind is int and float(value) != int(value))
        if bad_kind or value > high or value < low or (value == low and not low_ok):
            lo = "[" if low_ok else "("
            raise MoEConfigError(
                f"{_flag(name)} must be a finite {'integer' if kind is int else 'number'} in {lo}{low}, {high}], "
                f"got {value} ({hint})"
            )
    from .dispatch import DISPATCHERS
    from .eviction import POLICIES
    from .prefetch import PREDICTORS

    for name, choices in (("moe_gating", sorted(DISPATCHERS)), ("moe_second_expert_policy", SECOND_EXPERT_POLICIES),
                          ("moe_buffer_policy", sorted(POLICIES)), ("moe_prefetch", sorted(PREDICTORS)),
                          ("moe_cpu_experts", CPU_EXPERT_MODES)):
        value = values.get(name)
        if value is not None and value not in choices:
            raise MoEConfigError(f"unknown {_flag(name)} '{value}'; choose one of {', '.join(choices)}")
    slots = values.get("moe_expert_buffer_size")
    if slots is not None and not slots:
        for name, off in (("moe_prefetch", (None, "none")), ("moe_cpu_experts", (None, "off"))):
            if values.get(name) not in off:
                raise MoEConfigError(f"{_flag(name)} {values[name]} handles the misses "
                                     "of expert buffering: add --moe-expert-buffer-size K (K >= 1 device slots per MoE "
                                     "layer), or drop it")
    k = values.get("k")
    if k is not None and k not in (1, 2):
        raise MoEConfigError(f"top-k gating supports k=1 or k=2, got k={k}")
    count = values.get("moe_expert_count")
    if k is not None and count is not None and count < k:
        raise MoEConfigError(
            f"--moe-expert-count={count} is smaller than top-k={k}; "
            "use at least 2 experts for top-2 gating or pass --moe-top1-expert"
        )
