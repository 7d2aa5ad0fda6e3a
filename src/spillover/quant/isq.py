"""In-situ quantization (ISQ): swap a layer's nn.Linear projections for quantized ones, right after that
layer's weights are loaded (so at most one layer exists at full precision beside the quantized model).

Formats and their bytes are defined in `quant/formats.py` (the planner counts the same tensors):
- 8 bits: int8 weight, one bf16 scale per output row. On CPU the matmul runs in torch's int8 weight-only
  kernel (`_weight_int8pack_mm`: reads 1 byte per weight); elsewhere the weight is dequantized per call.
- 4 bits: int4 in groups of 32 with bf16 scale and zero. On CPU: torch's int4 kernel for decode-sized inputs
  and a dense bf16 copy for prompts (quant/formats.py says why); elsewhere dequantized per call (a fused GPU
  int4 kernel is future work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spillover.quant.formats import (
    CPU_INT4_DENSE_COPY,
    INT4_GROUP_SIZE,
    INT4_KERNEL_MAX_ROWS,
    isq_stored_tensors,
)


class Int8Linear(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach().float()  # [out, in]
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # [out]
        self.qweight = nn.Parameter(
            (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), requires_grad=False
        )
        self.scale = nn.Parameter(scale.to(torch.bfloat16), requires_grad=False)
        self.bias = lin.bias
        self.out_features, self.in_features = w.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32):
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, shape[-1]), self.qweight, self.scale.to(x.dtype)
            )
            y = y.reshape(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantize(x.dtype), self.bias)


class Int4Linear(nn.Module):
    """int4 weights, groups of 32 along the input, bf16 scale and zero per group.

    On CPU the weight is kept in the layout of torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`,
    which reads half a byte per weight and takes bf16 activations: the input of this projection is rounded
    to bf16, the output comes back in the input's dtype, and the residual stream keeps its dtype). Elsewhere
    the plain layout of `quant/formats.py` is dequantized per call. Same bytes either way.
    """

    def __init__(self, lin: nn.Linear, on_cpu: bool = False) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        out, inp = w.shape
        self.dense = None
        if on_cpu and CPU_INT4_DENSE_COPY:  # prompts use this bf16 copy (see quant/formats.py)
            self.dense = nn.Parameter(lin.weight.detach().to(torch.bfloat16), requires_grad=False)
        G = -(-inp // INT4_GROUP_SIZE)
        w = F.pad(w, (0, G * INT4_GROUP_SIZE - inp)).view(out, G, INT4_GROUP_SIZE)
        lo, hi = w.amin(-1), w.amax(-1)  # [out, G]
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        zero = -lo / scale
        q = (w / scale[..., None] + zero[..., None]).round().clamp(0, 15).to(torch.uint8).view(out, -1)
        self.cpu_kernel = on_cpu and inp % INT4_GROUP_SIZE == 0 and out % 16 == 0
        if self.cpu_kernel:  # kernel layout; scales_and_zeros[g, o] = (scale, value at q = 8)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            sz = torch.stack([scale, (8.0 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
            self.qweight = nn.Parameter(packed, requires_grad=False)
            self.scales_zeros = nn.Parameter(sz.to(torch.bfloat16), requires_grad=False)  # [G, out, 2]
        else:
            self.qweight = nn.Parameter(
                q[:, 0::2] | (q[:, 1::2] << 4), requires_grad=False
            )  # 2j low, 2j+1 high
            self.scale = nn.Parameter(scale.to(torch.bfloat16), requires_grad=False)
            self.zero = nn.Parameter(zero.to(torch.bfloat16), requires_grad=False)
        self.bias = lin.bias
        self.out_features, self.in_features, self.groups = out, inp, G

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.cpu_kernel:  # W^T = I @ W^T through the kernel itself (tests and rare paths only)
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            wt = torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, self.qweight, INT4_GROUP_SIZE, self.scales_zeros
            )
            return wt.T.to(dtype)
        q = torch.stack([self.qweight & 0x0F, self.qweight >> 4], dim=-1).view(
            self.out_features, self.groups, -1
        )
        w = (q.to(dtype) - self.zero.to(dtype)[..., None]) * self.scale.to(dtype)[..., None]
        return w.view(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel and x.device.type == "cpu":
            shape = x.shape
            xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
            if self.dense is not None and xb.shape[0] > INT4_KERNEL_MAX_ROWS:
                y = F.linear(xb, self.dense)  # prefill: dense bf16 GEMM
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xb, self.qweight, INT4_GROUP_SIZE, self.scales_zeros
                )
            y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantize(x.dtype), self.bias)


def quantize_layer(layer: nn.Module, bits: int, on_cpu: bool = False) -> None:
    """Replace every nn.Linear inside `layer` (a decoder layer) with its quantized form, in place.
    `on_cpu`: the layer is computed on the CPU (its kernels and copies are chosen for that)."""
    for name, mod in list(layer.named_modules()):
        if isinstance(mod, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            q = Int4Linear(mod, on_cpu) if bits == 4 else Int8Linear(mod)
            expected = isq_stored_tensors(tuple(mod.weight.shape), bits)["qweight"][0]
            assert q.qweight.numel() == expected[0] * expected[1]  # the bytes the planner counted
            setattr(parent, attr, q)
