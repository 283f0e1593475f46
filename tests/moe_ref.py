"""Float64 reference of a routed-experts layer, shared by the CPU and GPU tests (imported top-level: conftest)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_float64(x, ids, w, gate, up, down) -> torch.Tensor:
    """sum_k w[t, k] down_e(silu(gate_e x_t) * up_e x_t) in float64, on x's device; weights [E, out, in]."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in range(gate.shape[0]):
        t, k = (ids == e).nonzero(as_tuple=True)
        if t.numel():
            xe = x[t].double()
            h = F.silu(xe @ gate[e].double().T) * (xe @ up[e].double().T)
            out.index_add_(0, t, (h @ down[e].double().T) * w[t, k].double()[:, None])
    return out
