"""When to run a missed expert on the CPU instead of copying it (``--moe-cpu-experts auto``).

Beyond the paper (Huang et al. 2024 buffer experts in CPU memory and always copy a missed
expert in, Sec. 5): an expert that is not in a device slot and received only a few tokens can
be computed on the CPU from its (pinned) host copy, as Fiddler (Kamahori et al. 2024) and
llama.cpp's partial offloading do; only the token rows travel (down and back), not the weights.
:class:`CPUExpertCostModel` is the small cost model that decides it, per expert and call, from
rates measured by the buffered store (:class:`~fairseq_moe_infer.moe.buffered.ExpertBuffer`).

Cost of ``n`` token rows of one expert (model width d, expert width f, B bytes of expert weights,
s bytes per activation element; biases and the activation function are left out of the FLOPs):

* FLOPs(n) = 4 n d f (two GEMMs, ``d -> f -> d``, 2 FLOPs per multiply-add);
* copy it in and run it on the device: ``t_copy(n) = B / R_h2d + FLOPs(n) / R_dev``;
* run it on the CPU: ``t_cpu(n) = FLOPs(n) / R_cpu + 2 n d s / R_h2d`` (rows down, results up;
  device-to-host taken at the host-to-device rate).

The expert runs on the CPU when ``t_cpu(n) < t_copy(n)``, i.e. for
``n < (B / R_h2d) / (4 d f / R_cpu + 2 d s / R_h2d - 4 d f / R_dev)`` (every n when the
denominator is <= 0). The decision ignores the cache: a CPU-run expert does not enter a slot (so
it evicts nothing, and is not resident for a later call).

Rates: ``R_h2d`` host-to-device bytes/s, from the store's own expert copies (CUDA events; host
time on a CPU "device"); ``R_cpu`` FLOP/s of the CPU expert runs (host time); ``R_dev`` FLOP/s
of the device expert computes (CUDA events; host time on a CPU "device"). Each is the total
measured (bytes or FLOPs) over the total seconds; until the first measurement of a rate the
warm-up default of :data:`DEFAULT_RATES` for the device type is used.
"""

import math
from typing import Dict, Optional

RATE_NAMES = ("h2d_bytes_per_s", "cpu_flops_per_s", "device_flops_per_s")

# Warm-up defaults, replaced by measurements as they come. cuda: PCIe 5 x16 pinned copies
# (~25 GB/s seen, 64 GB/s peak), a many-core host running bf16/fp16 GEMMs (~0.1 TFLOP/s), a
# Hopper GPU on small expert GEMMs (~200 TFLOP/s of its ~990 peak bf16). cpu ("device" = CPU
# memory): a memcpy of a few GB/s, and the same CPU computing both ways.
DEFAULT_RATES: Dict[str, Dict[str, float]] = {
    "cuda": {"h2d_bytes_per_s": 2.5e10, "cpu_flops_per_s": 1.0e11, "device_flops_per_s": 2.0e14},
    "cpu": {"h2d_bytes_per_s": 5.0e9, "cpu_flops_per_s": 2.0e10, "device_flops_per_s": 2.0e10},
}


class CPUExpertCostModel:
    """Decides whether a missed expert with ``n`` token rows runs on the CPU (module docstring).

    Args:
        model_dim: d.
        ffn_dim: f, the expert's hidden width.
        bytes_per_expert: B, bytes of one expert's weights and biases (what a copy moves).
        activation_bytes: s, bytes per element of the token rows.
        device_type: ``cuda`` or ``cpu``: picks the warm-up defaults.
        rates: rates to use instead of the defaults (keys of :data:`RATE_NAMES`, in bytes/s or
            FLOP/s; missing keys keep the default).
        measure: False: keep the rates fixed (tests inject them); True: measurements replace them.

    Raises:
        ValueError: a rate that is not a finite positive number, or an unknown rate name.
    """

    def __init__(self, model_dim: int, ffn_dim: int, bytes_per_expert: int, activation_bytes: int,
                 device_type: str = "cuda", rates: Optional[Dict[str, float]] = None, measure: bool = True):
        self.d, self.f, self.bytes_per_expert, self.activation_bytes = model_dim, ffn_dim, bytes_per_expert, activation_bytes
        self.defaults = dict(DEFAULT_RATES["cuda" if device_type == "cuda" else "cpu"])
        for name, value in (rates or {}).items():
            if name not in RATE_NAMES:
                raise ValueError(f"unknown rate '{name}'; known: {', '.join(RATE_NAMES)}")
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"rate {name} must be a finite positive number, got {value}")
            self.defaults[name] = float(value)
        self.measure = measure
        self.amount = {n: 0.0 for n in RATE_NAMES}  # bytes or FLOPs measured
        self.seconds = {n: 0.0 for n in RATE_NAMES}

    # ---- measurements ---------------------------------------------------------------
    def _observe(self, name: str, amount: float, seconds: float) -> None:
        if self.measure and amount > 0 and seconds > 0 and math.isfinite(seconds):
            self.amount[name] += amount
            self.seconds[name] += seconds

    def observe_copy(self, nbytes: float, seconds: float) -> None:
        """``nbytes`` of expert weights were copied host to device in ``seconds``."""
        self._observe("h2d_bytes_per_s", nbytes, seconds)

    def observe_cpu(self, flops: float, seconds: float) -> None:
        """A CPU expert run of ``flops`` FLOPs took ``seconds``."""
        self._observe("cpu_flops_per_s", flops, seconds)

    def observe_device(self, flops: float, seconds: float) -> None:
        """Device expert computes of ``flops`` FLOPs took ``seconds``."""
        self._observe("device_flops_per_s", flops, seconds)

    def rate(self, name: str) -> float:
        """The measured rate ``name`` (total over total seconds), or its default before any measurement."""
        return self.amount[name] / self.seconds[name] if self.seconds[name] > 0 else self.defaults[name]

    def rates(self) -> dict:
        """``{name: {"value": rate, "measured": bool}}`` for the three rates."""
        return {n: {"value": float(f"{self.rate(n):.4g}"), "measured": self.seconds[n] > 0} for n in RATE_NAMES}

    # ---- the decision ---------------------------------------------------------------
    def flops(self, n: int) -> float:
        """FLOPs of ``n`` token rows through one expert: 4 n d f."""
        return 4.0 * n * self.d * self.f

    def copy_cost_s(self, n: int) -> float:
        """Seconds to copy the expert in and run ``n`` rows on the device: B / R_h2d + FLOPs(n) / R_dev."""
        return self.bytes_per_expert / self.rate("h2d_bytes_per_s") + self.flops(n) / self.rate("device_flops_per_s")

    def cpu_cost_s(self, n: int) -> float:
        """Seconds to run ``n`` rows on the CPU: FLOPs(n) / R_cpu + 2 n d s / R_h2d."""
        moved = 2.0 * n * self.d * self.activation_bytes
        return self.flops(n) / self.rate("cpu_flops_per_s") + moved / self.rate("h2d_bytes_per_s")

    def run_on_cpu(self, n: int) -> bool:
        """Whether a missed expert with ``n`` >= 1 token rows is cheaper on the CPU."""
        return n > 0 and self.cpu_cost_s(n) < self.copy_cost_s(n)

    def max_cpu_tokens(self) -> float:
        """The break-even row count: the expert runs on the CPU for n below it (inf: always)."""
        per_row = (4.0 * self.d * self.f / self.rate("cpu_flops_per_s")
                   + 2.0 * self.d * self.activation_bytes / self.rate("h2d_bytes_per_s")
                   - 4.0 * self.d * self.f / self.rate("device_flops_per_s"))
        fixed = self.bytes_per_expert / self.rate("h2d_bytes_per_s")
        return math.inf if per_row <= 0 else fixed / per_row
