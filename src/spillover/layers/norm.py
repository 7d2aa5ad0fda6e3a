"""RMSNorm, optionally fused with the residual add before it (fp32 accumulation).

CUDA tensors take one Triton kernel (layers/triton_fused.py); elsewhere torch's F.rms_norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spillover.layers import triton_fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [..., dim] -> norm(x); with `residual`: h = x + residual, returns (norm(h), h)."""
        res = () if residual is None else (residual,)
        if x.dim() in (2, 3) and triton_fused.usable(x, self.weight, *res):
            return triton_fused.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:  # torch's fused kernel; it accumulates in fp32 for bf16/f16 inputs
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x + residual
        return F.rms_norm(h, self.weight.shape, self.weight, self.eps), h
