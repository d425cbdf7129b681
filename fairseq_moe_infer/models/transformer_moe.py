"""``transformer_moe``: fairseq's encoder-decoder ``TransformerModel`` with MoE FFNs."""

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel, base_architecture

from .moe_config import MoEModelConfig, add_pad_mask_argument, set_moe_defaults, validate_moe_args
from .moe_transformer_layer import convert_to_moe
from .validation import cli_errors


@register_model("transformer_moe")
class TransformerMoEModel(TransformerModel):
    """Translation transformer; every ``--moe-freq``-th FFN of the encoder and of the
    decoder is an MoE layer. ``--moe-freq 0`` gives the dense baseline."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_pad_mask_argument(parser)  # before the dataclass's bare flag, which fairseq then skips
        gen_parser_from_dataclass(parser, MoEModelConfig(), delete_default=True)

    @classmethod
    def build_model(cls, args, task):
        with cli_errors():
            transformer_moe(args)
            validate_moe_args(args)
            return super().build_model(args, task)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's loading; a checkpoint whose expert count differs ends the tool with one line."""
        with cli_errors():
            return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        encoder = super().build_encoder(args, src_dict, embed_tokens)
        convert_to_moe(encoder, args, decoder=False)
        return encoder

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        decoder = super().build_decoder(args, tgt_dict, embed_tokens)
        convert_to_moe(decoder, args, decoder=True, no_encoder_attn=getattr(args, "no_encoder_attn", False))
        return decoder


@register_model_architecture("transformer_moe", "transformer_moe")
def transformer_moe(args):
    """fairseq's base transformer (d=512, 6+6 layers, FFN 2048) with 16 experts every 2nd layer."""
    set_moe_defaults(args)
    base_architecture(args)


@register_model_architecture("transformer_moe", "transformer_moe_small")
def transformer_moe_small(args):
    """d=256, 4+4 layers, 4 heads, FFN 512; 16 experts of width 256 every 2nd layer,
    in encoder and decoder; shared embeddings. Top-2 over width-256 experts gives
    the same active FFN parameters as the dense width-512 FFN (``--moe-freq 0``).
    This is the bundled translation model's shape."""
    for side in ("encoder", "decoder"):
        setattr(args, f"{side}_embed_dim", getattr(args, f"{side}_embed_dim", 256))
        setattr(args, f"{side}_ffn_embed_dim", getattr(args, f"{side}_ffn_embed_dim", 512))
        setattr(args, f"{side}_layers", getattr(args, f"{side}_layers", 4))
        setattr(args, f"{side}_attention_heads", getattr(args, f"{side}_attention_heads", 4))
    args.moe_expert_ffn_dim = getattr(args, "moe_expert_ffn_dim", None) or 256
    args.share_all_embeddings = getattr(args, "share_all_embeddings", True)
    transformer_moe(args)
