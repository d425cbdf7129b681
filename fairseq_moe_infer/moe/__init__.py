"""The MoE layer and its parts: gate, dispatchers, experts, all-to-all."""

from .dispatch import DISPATCHERS, Dispatcher, DispatchStats, build_dispatcher, register_dispatcher
from .experts import EXPERT_PARAMS, Experts, gather_expert_stack, is_expert_key, is_expert_param
from .gate import MoEConfigError, Routing, TopKGate
from .moe_layer import MoELayer, moe_layers

__all__ = [
    "DISPATCHERS",
    "EXPERT_PARAMS",
    "DispatchStats",
    "Dispatcher",
    "Experts",
    "MoEConfigError",
    "MoELayer",
    "Routing",
    "TopKGate",
    "moe_layers",
    "build_dispatcher",
    "gather_expert_stack",
    "is_expert_key",
    "is_expert_param",
    "register_dispatcher",
]
