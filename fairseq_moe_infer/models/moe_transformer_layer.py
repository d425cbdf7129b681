"""fairseq transformer layers whose FFN is an MoE layer.

The subclasses reuse fairseq's ``TransformerEncoderLayerBase`` /
``TransformerDecoderLayerBase`` forward unchanged: the FFN slot
``fc2(dropout(act(fc1(x))))`` is filled by the MoE layer in place of ``fc1``
(activation and activation dropout move inside the experts, ``fc2`` becomes the
identity). The MoE layer is registered as ``moe_layer`` (fairseq MoE's name), so
its parameters appear as ``...layers.{i}.moe_layer.gate.wg.weight`` and
``...moe_layer.experts.fc1_weight``.

The padding mask is handed to the MoE layer, which routes padding tokens to no
expert (or, with ``use_moe_pad_mask=False`` as in fairseq's MoE branch by default,
like real tokens); tokens are routed in batch-major order, as fairseq's ``MOELayer``
(which transposes to [B, T, d]) does.
"""

import logging
from typing import Optional

from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from torch import Tensor, nn

from ..moe import MoELayer
from .moe_config import build_moe_layer

logger = logging.getLogger(__name__)


def _identity(x: Tensor) -> Tensor:
    return x


class _MoEFeedForwardSlot:
    """Mixin putting an :class:`MoELayer` in a fairseq transformer layer's FFN slot."""

    moe_layer: MoELayer

    def _moe_setup(self) -> None:
        # fairseq's __init__ registered our MoE layer as "fc1": rename it
        self.moe_layer = self._modules.pop("fc1")
        self.activation_fn = _identity
        self.activation_dropout_module = nn.Identity()
        self._moe_padding_mask: Optional[Tensor] = None

    @property
    def fc1(self):
        return self._moe_ffn

    def _moe_ffn(self, x: Tensor) -> Tensor:
        """x: [T, B, d] (fairseq time-first) -> [T, B, d]."""
        y = self.moe_layer(x.transpose(0, 1), self._moe_padding_mask)
        self._moe_padding_mask = None
        return y.transpose(0, 1)

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return build_moe_layer(
            self._moe_args, input_dim, output_dim, self._moe_cfg.activation_fn, _activation_dropout(self._moe_cfg)
        )

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return nn.Identity()


def _activation_dropout(cfg) -> float:
    # fairseq falls back to relu_dropout when activation_dropout is 0
    return float(cfg.activation_dropout or getattr(cfg, "relu_dropout", 0) or 0)


class MoETransformerEncoderLayer(_MoEFeedForwardSlot, TransformerEncoderLayerBase):
    """Encoder layer with an MoE FFN.

    Args:
        cfg: fairseq ``TransformerConfig``.
        moe_args: namespace with the ``--moe-*`` model options.
    """

    def __init__(self, cfg, moe_args, return_fc: bool = False):
        self._moe_args, self._moe_cfg = moe_args, cfg
        super().__init__(cfg, return_fc)
        self._moe_setup()

    def forward(self, x, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        self._moe_padding_mask = encoder_padding_mask
        return super().forward(x, encoder_padding_mask, attn_mask)


class MoETransformerDecoderLayer(_MoEFeedForwardSlot, TransformerDecoderLayerBase):
    """Decoder layer with an MoE FFN (see :class:`MoETransformerEncoderLayer`)."""

    def __init__(self, cfg, moe_args, no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False):
        self._moe_args, self._moe_cfg = moe_args, cfg
        super().__init__(cfg, no_encoder_attn, add_bias_kv, add_zero_attn)
        self._moe_setup()

    def forward(
        self,
        x,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state=None,
        prev_self_attn_state=None,
        prev_attn_state=None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        self._moe_padding_mask = self_attn_padding_mask
        return super().forward(
            x,
            encoder_out,
            encoder_padding_mask,
            incremental_state,
            prev_self_attn_state,
            prev_attn_state,
            self_attn_mask,
            self_attn_padding_mask,
            need_attn,
            need_head_weights,
        )


def convert_to_moe(stack, moe_args, decoder: bool, no_encoder_attn: bool = False) -> None:
    """Replace every ``moe_freq``-th layer of a built fairseq encoder/decoder by its MoE twin.

    Args:
        stack: a ``TransformerEncoderBase`` or ``TransformerDecoderBase`` (has ``.cfg``
            and ``.layers``).
        moe_args: namespace with the ``--moe-*`` model options.
        decoder: whether ``stack`` is a decoder.
        no_encoder_attn: decoder without encoder attention (language models).
    """
    from .moe_config import is_moe_layer

    freq = getattr(moe_args, "moe_freq", 0)
    if freq > 0 and not any(is_moe_layer(moe_args, i) for i in range(len(stack.layers))):
        logger.warning(
            f"--moe-freq {freq} with {len(stack.layers)} {'decoder' if decoder else 'encoder'} layers makes none of "
            f"them an MoE layer (layer i is MoE if (i + 1) % {freq} == 0): this stack is dense"
        )
    for i in range(len(stack.layers)):
        if not is_moe_layer(moe_args, i):
            continue
        if decoder:
            stack.layers[i] = MoETransformerDecoderLayer(stack.cfg, moe_args, no_encoder_attn)
        else:
            stack.layers[i] = MoETransformerEncoderLayer(stack.cfg, moe_args)
