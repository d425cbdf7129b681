"""MoE model architectures registered with fairseq."""

from . import transformer_lm_moe, transformer_moe  # noqa: F401 (registration)
