"""The MoE layer and its parts: gate, dispatchers, experts, all-to-all."""

from .dispatch import DISPATCHERS, Dispatcher, DispatchStats, build_dispatcher, register_dispatcher
from .experts import Experts
from .gate import MoEConfigError, Routing, TopKGate
from .moe_layer import MoELayer, moe_layers

__all__ = [
    "DISPATCHERS",
    "DispatchStats",
    "Dispatcher",
    "Experts",
    "MoEConfigError",
    "MoELayer",
    "Routing",
    "TopKGate",
    "moe_layers",
    "build_dispatcher",
    "register_dispatcher",
]
