"""``transformer_lm_moe``: fairseq's ``TransformerLanguageModel`` with MoE FFNs."""

from dataclasses import dataclass

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig, base_lm_architecture

from .moe_config import MoEModelConfig, add_pad_mask_argument, set_moe_defaults, validate_moe_args
from .moe_transformer_layer import convert_to_moe
from .validation import cli_errors


@dataclass
class TransformerLanguageModelMoEConfig(TransformerLanguageModelConfig, MoEModelConfig):
    """fairseq's LM options plus the ``--moe-*`` model options."""


@register_model("transformer_lm_moe", dataclass=TransformerLanguageModelMoEConfig)
class TransformerLanguageModelMoE(TransformerLanguageModel):
    """Decoder-only transformer LM; every ``--moe-freq``-th FFN is an MoE layer.

    ``--moe-freq 0`` gives the dense model of the same shape (the baseline).
    """

    @classmethod
    def add_args(cls, parser):
        add_pad_mask_argument(parser)  # first: --use-moe-pad-mask [True|False]; fairseq skips its bare flag
        super().add_args(parser)

    @classmethod
    def build_model(cls, args, task):
        with cli_errors():
            validate_moe_args(args)
            model = super().build_model(args, task)
            convert_to_moe(model.decoder, args, decoder=True, no_encoder_attn=True)
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's loading; a checkpoint whose expert count differs ends the tool with one line."""
        with cli_errors():
            return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


def transformer_lm_moe(args):
    """fairseq's base LM (d=512, 6 layers, FFN 2048, 8 heads) with 16 experts every 2nd layer.

    ``register_model`` already registers the ``transformer_lm_moe`` architecture
    from the dataclass defaults; presets call this to fill what they leave unset.
    """
    set_moe_defaults(args)
    base_lm_architecture(args)


@register_model_architecture("transformer_lm_moe", "transformer_lm_moe_small")
def transformer_lm_moe_small(args):
    """d=256, 4 layers, 4 heads, FFN 512; 16 experts of width 256 every 2nd layer.

    With top-2 gating each token runs two width-256 experts, so its FFN compute
    equals the dense width-512 FFN: ``--moe-freq 0`` is the dense baseline with
    the same active parameters. This is the bundled LM's shape.
    """
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 256)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 512)
    args.decoder_layers = getattr(args, "decoder_layers", 4)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.moe_expert_ffn_dim = getattr(args, "moe_expert_ffn_dim", None) or 256
    args.share_decoder_input_output_embed = getattr(args, "share_decoder_input_output_embed", True)
    transformer_lm_moe(args)
