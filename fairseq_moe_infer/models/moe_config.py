"""Model options of the MoE architectures (``--moe-*`` model flags)."""

import argparse
from dataclasses import dataclass, field, fields
from typing import Optional

from fairseq.dataclass import FairseqDataclass

from ..moe import MoELayer
from ..moe.options import check_moe_options


@dataclass
class MoEModelConfig(FairseqDataclass):
    """MoE options shared by ``transformer_lm_moe`` and ``transformer_moe``.

    Names and meanings follow fairseq's MoE branch (``--moe-expert-count``,
    ``--moe-freq``, ``--moe-top1-expert``, ``--moe-gating-use-fp32``,
    ``--moe-second-expert-policy``, ``--moe-normalize-gate-prob-before-dropping``),
    plus ``--moe-expert-ffn-dim``, ``--moe-capacity-factor`` and ``--moe-gating``.

    ``--moe-gating`` is also an option of the ``moe_*`` tasks. Under ``fairseq-train`` with
    those tasks fairseq adds the model's options first and skips the task's duplicate; both
    store to ``args.moe_gating``, so one flag sets ``cfg.model`` and ``cfg.task`` alike. As a
    model option it sets the gating the layers are built with (and is stored in the
    checkpoint), so training through fairseq's stock tasks (``--task translation`` /
    ``language_modeling``) can use dynamic gating too, and a checkpoint evaluated through a
    stock task keeps the gating it was trained with. The ``moe_*`` tasks apply their own
    ``--moe-gating`` (default static) over it at every build, so at evaluation the tool's
    flag decides.
    """

    moe_expert_count: int = field(
        default=16, metadata={"help": "number of experts E in each MoE layer, over all expert-parallel ranks"}
    )
    moe_freq: int = field(
        default=2,
        metadata={"help": "every moe_freq-th FFN becomes an MoE layer (layer i if (i + 1) % moe_freq == 0); 0 = dense"},
    )
    moe_expert_ffn_dim: int = field(
        default=0, metadata={"help": "hidden width of each expert; 0 = the FFN width (--*-ffn-embed-dim)"}
    )
    moe_top1_expert: bool = field(default=False, metadata={"help": "top-1 (Switch) gating instead of top-2 (GShard)"})
    moe_gating_use_fp32: bool = field(default=False, metadata={"help": "compute gate logits and softmax in float32"})
    moe_second_expert_policy: str = field(
        default="sampling",
        metadata={"help": "top-2 second expert in training: sampling (Gumbel noise) | all | random (keep with prob 2*p2)"},
    )
    moe_normalize_gate_prob_before_dropping: bool = field(
        default=False, metadata={"help": "renormalise top-2 gate probabilities before capacity dropping"}
    )
    moe_capacity_factor: float = field(
        default=1.0,
        metadata={"help": "static gating training capacity = int(factor * k * ceil(tokens / experts)) per expert"},
    )
    use_moe_pad_mask: Optional[bool] = field(
        default=None,
        metadata={
            "help": "[True|False] mask padding tokens out of routing (fairseq MoE branch's flag; the bare flag means "
            "True). Unset: masked, this plugin's default. False (the branch's default, stored by "
            "scripts/convert_fairseq_moe_checkpoint.py for branch checkpoints trained without the flag; at "
            "evaluation --model-overrides \"{'use_moe_pad_mask': False}\"): padding is routed like real tokens, "
            "takes capacity slots and counts in the balancing loss, as in the branch"
        },
    )
    moe_gating: str = field(
        default="static",
        metadata={
            "help": "gating the MoE layers are built with (training, and any task): static (fairseq/GShard fixed "
            "capacity, drops overflow) | dynamic (exact per-expert counts, drops nothing); the moe_* tasks' "
            "--moe-gating is the same flag and also applies at evaluation"
        },
    )


MOE_FIELDS = [f for f in fields(MoEModelConfig) if not f.name.startswith("_")]


def parse_bool(text: str) -> bool:
    """``True``/``False`` (also ``true``/``false``, ``1``/``0``) as a command-line value.

    Raises:
        argparse.ArgumentTypeError: anything else (argparse prints it on one line with the flag's name).
    """
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(
            f"expected True or False, got '{text}' (the bare flag means True; put it after the data folder "
            "or give it a value)")
    return value


def add_pad_mask_argument(parser) -> None:
    """Add ``--use-moe-pad-mask [True|False]`` (fairseq's MoE branch's flag, same name and meaning).

    fairseq turns a bool dataclass field into a bare ``store_true`` flag, so ``--use-moe-pad-mask
    False`` could not be given and a model could not be trained with padding routed (the branch's
    default) from the command line. Call it before fairseq adds the dataclass's options: fairseq
    then skips its own conflicting flag (``gen_parser_from_dataclass`` ignores ``ArgumentError``).
    The bare flag still means True, as in the branch."""
    f = next(f for f in MOE_FIELDS if f.name == "use_moe_pad_mask")
    parser.add_argument("--use-moe-pad-mask", type=parse_bool, nargs="?", const=True, metavar="BOOL",
                        help=f.metadata["help"])


def set_moe_defaults(args) -> None:
    """Fill unset MoE options on a legacy args namespace with their defaults."""
    for f in MOE_FIELDS:
        if getattr(args, f.name, None) is None:
            setattr(args, f.name, f.default)


def validate_moe_args(args) -> None:
    """Check the MoE model options.

    Raises:
        MoEConfigError: naming the flag and the fix (rules: :mod:`fairseq_moe_infer.moe.options`).
    """
    check_moe_options(
        **{f.name: getattr(args, f.name) for f in MOE_FIELDS if f.name != "moe_top1_expert"},
        k=(1 if args.moe_top1_expert else 2) if args.moe_freq else None,  # a dense model (freq 0) has no gate
    )


def is_moe_layer(args, index: int) -> bool:
    """fairseq's rule: layer ``index`` (0-based) is MoE if ``(index + 1) % moe_freq == 0``."""
    return args.moe_freq > 0 and (index + 1) % args.moe_freq == 0


def build_moe_layer(args, model_dim: int, ffn_dim: int, activation_fn: str, activation_dropout: float) -> MoELayer:
    """An :class:`~fairseq_moe_infer.moe.MoELayer` from the model options (``--moe-gating``,
    static by default, with fairseq's evaluation capacity fraction 0.25)."""
    layer = MoELayer(
        model_dim,
        args.moe_expert_ffn_dim or ffn_dim,
        args.moe_expert_count,
        k=1 if args.moe_top1_expert else 2,
        activation_fn=activation_fn,
        activation_dropout=activation_dropout,
        use_fp32_gate=args.moe_gating_use_fp32,
        second_expert_policy=args.moe_second_expert_policy,
        normalize_before_dropping=args.moe_normalize_gate_prob_before_dropping,
        capacity_factor=args.moe_capacity_factor,
        route_padding=getattr(args, "use_moe_pad_mask", None) is False,
    )
    layer.set_gating(args.moe_gating)
    return layer
