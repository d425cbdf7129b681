"""An independent float64 per-token reference of fairseq's MoE layer semantics.

Written as plain Python loops over tokens and experts (no one-hot tensors, no
sorting), from the rules in fairseq's ``top1gate.py`` / ``top2gate.py``:
first choices take capacity slots in token order, then second choices; a top-2
token's kept weights are renormalised to sum to one.
"""

import math

import torch


@torch.no_grad()
def reference_moe(layer, x, padding_mask=None, capacity=None):
    """Output [T, d] float64 of ``layer`` (an MoELayer, eval mode, deterministic routing).

    Args:
        layer: MoELayer (its gate weights and experts are read, nothing else).
        x: [T, d] input.
        padding_mask: [T] bool or None.
        capacity: per-expert capacity, or None for unlimited (dynamic).

    Returns:
        (y [T, d] float64, dropped count, per-expert kept counts list).
    """
    x = x.double()
    T, d = x.shape
    wg = layer.gate.wg.weight.double()
    k = layer.gate.k
    ex = layer.experts
    E = wg.shape[0]
    pad = [False] * T if padding_mask is None else padding_mask.tolist()

    choices = []  # per token: list of (expert, prob)
    for t in range(T):
        logits = [float(torch.dot(wg[e], x[t])) for e in range(E)]
        m = max(logits)
        z = sum(math.exp(v - m) for v in logits)
        probs = [math.exp(v - m) / z for v in logits]
        first = max(range(E), key=lambda e: (probs[e], -e))
        picks = [first]
        if k == 2:
            second = max((e for e in range(E) if e != first), key=lambda e: (logits[e], -e))
            picks.append(second)
        choices.append([(e, probs[e]) for e in picks])

    used = [0] * E
    kept = [[False] * k for _ in range(T)]
    for i in range(k):  # all first choices, then all second choices
        for t in range(T):
            if pad[t]:
                continue
            e = choices[t][i][0]
            if capacity is None or used[e] < capacity:
                used[e] += 1
                kept[t][i] = True
    dropped = sum(1 for t in range(T) if not pad[t] for i in range(k) if not kept[t][i])

    y = torch.zeros(T, d, dtype=torch.float64)
    act = ex.activation_fn
    for t in range(T):
        if pad[t]:
            continue
        w = [p if kept[t][i] else 0.0 for i, (_, p) in enumerate(choices[t])]
        if k == 2:
            s = sum(w)
            w = [v / s if s > 0 else 0.0 for v in w]
        for i, (e, _) in enumerate(choices[t]):
            if w[i] == 0.0:
                continue
            h = act(ex.fc1_weight[e].double() @ x[t] + ex.fc1_bias[e].double())
            y[t] += w[i] * (ex.fc2_weight[e].double() @ h + ex.fc2_bias[e].double())
    return y, dropped, used
