"""Mixture-of-experts building blocks: top-k routing and the experts of one layer as stacked weights.

`Experts` holds every expert's SwiGLU MLP as 3-D parameters, like llama.cpp's `ffn_*_exps`:
`gate_up_proj` [E, 2I, H] (gate rows then up rows per expert) and `down_proj` [E, H, I]. The experts are their
own stage (`layers.<i>.experts`, models/arch/base.py): they may live on another device than the rest of their
layer. They compute where their weights are: the step's hidden states go there once per layer (one copy, not
one per expert) and the combined result comes back.

- Gathered (GPU, up to GATHER_MAX_ROWS (token, slot) pairs: decode): no host sync, so CUDA graphs capture it.
  Dense experts: the chosen experts' weights are indexed into one batch and multiplied by `bmm`. Quantized
  experts: one Triton GEMV launch per projection reads each pair's expert through its id
  (quant/kernels.py `gemv_w4` / `gemv_w8` with `idx`), nothing copied.
- Few (CPU, up to GATHER_MAX_ROWS pairs: decode): the pairs are grouped by expert in Python (no sort, no
  host-device traffic besides one copy of the step's rows, ids and weights) and each hit expert runs once.
  One token's bf16 experts run as one C call per projection for all k experts (layers/cpu_gemv.c, which
  streams the weights faster than torch); without the compiled kernel, a one-row bf16 GEMV runs in torch's
  own kernel rather than oneDNN's when that measured faster on this CPU (`cpu_native_gemv`: ~2.7x on an AMD
  EPYC for Qwen3-30B-A3B's expert shapes).
- Grouped (prompts): the pairs are sorted by expert and each expert that got tokens runs once on its rows.

Only the chosen experts' bytes are read. ISQ (`quantize_`): each expert matrix becomes a quantized linear of
quant/isq.py; their tensors are stacked over the experts ([E, ...] parameters, which the GPU kernels index),
and per-expert modules that view them serve the CPU kernels (int4 / int8) and prompts.
"""

from __future__ import annotations

import os
import resource
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from spillover.layers import cpu_linear

GATHER_MAX_ROWS = 64
"""Most (token, slot) pairs the gathered path takes on a GPU (batch 8 at top-8), and the few-pairs path on the
CPU. Dense GPU experts copy the chosen weights once more than the grouped path reads them, which stays cheaper
than a host sync per layer only for decode-sized steps."""

PIN_MIN_BYTES = 32 << 20
"""Smallest expert tensor `Experts.pin_` page-locks: larger ones are allocations of their own pages (glibc maps
them apart), so two registrations never overlap (an overlap fails, and CUDA reports the failure at a later
launch)."""

_NATIVE_GEMV: dict[tuple[int, int, torch.dtype], bool] = {}
"""Cache of `cpu_native_gemv`: per (out, in, dtype) of a CPU expert matrix, whether torch's own one-row GEMV
beat oneDNN's when first timed in this process."""


def cpu_native_gemv(stacked: torch.Tensor) -> bool:
    """Whether one-row products with the CPU experts `stacked` [E, out, in] run faster with oneDNN off
    (torch's own vectorized GEMV reads the weight as stored; oneDNN's bf16 matmul may repack it on every
    call). Timed once per shape and dtype over up to 16 of the experts (out of cache, a few ms), then cached."""
    key = (stacked.shape[1], stacked.shape[2], stacked.dtype)
    if key not in _NATIVE_GEMV:
        native = False
        if torch.backends.mkldnn.is_available() and stacked.dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(1, stacked.shape[2], dtype=stacked.dtype)
            ws = list(stacked[:16])
            best: dict[bool, float] = {}
            for _ in range(3):
                for nat in (False, True):
                    with _onednn(not nat), torch.no_grad():
                        t = time.perf_counter()
                        for w in ws:
                            F.linear(x, w)
                        dt = time.perf_counter() - t
                    best[nat] = min(best.get(nat, dt), dt)
            native = best[True] < best[False]
        _NATIVE_GEMV[key] = native
    return _NATIVE_GEMV[key]


class _onednn:
    """Context: oneDNN (mkldnn) matmuls on or off (torch.backends.mkldnn.enabled), restored on exit."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.prev = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = self.on

    def __exit__(self, *exc: object) -> None:
        torch.backends.mkldnn.enabled = self.prev


def route_topk(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (expert ids [T, k], weights [T, k] in fp32): softmax over all experts in fp32,
    the k largest, renormalized to sum to 1 when `normalize` (Mixtral; Qwen3-MoE's norm_topk_prob)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, k, dim=-1)
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))  # [E, H, I]
        # after ISQ, per projection ("gate_up_proj", "down_proj"): one quantized linear per expert, whose
        # tensors are views of the stacked parameters `<proj>_<tensor>` [E, ...] (not submodules: the stacked
        # parameters hold the bytes)
        self.q: dict[str, list[nn.Module]] = {}
        # experts in CPU memory, a GPU step of at least this many (token, slot) pairs: the hit experts are
        # copied to the GPU and computed there (prefill; the loader sets it from the cost model). None: never
        self.stream_pairs: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def quantized(self) -> bool:
        return bool(self.q)

    def _kernel_format(self) -> str | None:
        """The quantized GPU kernel that takes stacked experts: "w4" / "w8", or None (dense, or CPU layouts)."""
        from spillover.quant.isq import Int4Linear, Int8Linear

        mods = [m[0] for m in self.q.values()]
        if len(mods) == 2 and all(isinstance(m, Int8Linear) and not m.blocks for m in mods):
            return "w8"
        if len(mods) == 2 and all(isinstance(m, Int4Linear) and not m.cpu_kernel for m in mods):
            return "w4"
        return None

    def gathers(self, rows: int, device: torch.device) -> bool:
        """Whether `rows` (token, slot) pairs take the gathered path (no host sync) on `device`."""
        if device.type != "cuda":
            return False
        if self.quantized:
            from spillover.quant import kernels

            if self._kernel_format() is None or not kernels.ENABLED or not kernels.HAVE_TRITON:
                return False
        return rows <= GATHER_MAX_ROWS or torch.cuda.is_current_stream_capturing()  # graphs: no host sync

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, H]; idx, w [T, k] (chosen experts, their weights) -> sum_j w[t, j] * expert_idx[t, j](x[t])."""
        src, home = x.device, self.device
        T, k = idx.shape
        if home != src and self.streams(T * k, src):
            y = self._grouped(x, idx, stream=True)  # the hit experts' weights go to the GPU instead
            return (y.view(T, k, -1).float() * w.unsqueeze(-1)).sum(1).to(x.dtype)
        if home != src:  # experts in another memory (CPU): the step's rows go there once, the result back
            x, idx, w = (t.to(home, non_blocking=True) for t in (x, idx, w))
            if src.type == "cuda":  # the three copies were queued: one wait
                torch.cuda.current_stream(src).synchronize()
        if self.gathers(T * k, home):
            y = self._gathered(x, idx)
        elif home.type == "cpu" and T * k <= GATHER_MAX_ROWS:
            y = self._few(x, idx)
        else:
            y = self._grouped(x, idx)  # [T*k, H]
        out = (y.view(T, k, -1).float() * w.unsqueeze(-1)).sum(1).to(x.dtype)  # [T, H]
        return out.to(src, non_blocking=True) if home != src else out

    def pin_(self) -> bool:
        """Page-lock the CPU-resident dense expert weights in place (cudaHostRegister, no copy), so that the
        hit experts a long prompt copies to the GPU go at pinned bandwidth. False where it is not done (tensors
        under PIN_MIN_BYTES, memlock limits) or the driver refuses: those copies stay pageable. Unregistered
        when the weight is freed."""
        if not torch.cuda.is_available() or self.quantized:
            return False
        todo = [
            p for p in (self.gate_up_proj, self.down_proj) if p.device.type == "cpu" and not p.is_pinned()
        ]
        if any(p.numel() * p.element_size() < PIN_MIN_BYTES for p in todo):
            return False
        nbytes = sum(p.numel() * p.element_size() for p in todo)
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if os.geteuid() != 0 and soft != resource.RLIM_INFINITY and soft < nbytes:
            return False  # a refused registration would leave a CUDA error for the next launch to report
        rt, ok = torch.cuda.cudart(), True
        for p in todo:
            ptr = p.data_ptr()
            if int(rt.cudaHostRegister(ptr, p.numel() * p.element_size(), 0)) != 0:
                ok = False
                continue
            weakref.finalize(p, rt.cudaHostUnregister, ptr)
        return ok

    def streams(self, rows: int, device: torch.device) -> bool:
        """Whether a step of `rows` pairs on `device` copies the hit CPU-resident experts there (prefill)."""
        limit = self.stream_pairs
        return limit is not None and rows >= limit and device.type == "cuda" and not self.quantized

    def _gathered(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        flat, k = idx.reshape(-1), idx.shape[1]
        if self.quantized:  # one launch per projection; each pair reads its expert's quantized weights
            gu = self._q_experts("gate_up_proj", x, flat, k)  # [T*k, 2I]
            return self._q_experts("down_proj", _swiglu(gu, self.inter), flat, 1)  # [T*k, H]
        xr = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [T*k, H, 1]
        gu = torch.bmm(self.gate_up_proj[flat], xr).squeeze(-1)  # [T*k, 2I]
        h = _swiglu(gu, self.inter).unsqueeze(-1)  # [T*k, I, 1]
        return torch.bmm(self.down_proj[flat], h).squeeze(-1)  # [T*k, H]

    def _q_experts(self, proj: str, x: torch.Tensor, flat: torch.Tensor, rpt: int) -> torch.Tensor:
        """Row p of the result: x[p // rpt] times expert flat[p]'s quantized `proj` (Triton, stacked weights)."""
        from spillover.quant import kernels

        q = getattr(self, f"{proj}_qweight")
        x = x.contiguous()
        if self._kernel_format() == "w8":
            s, o = getattr(self, f"{proj}_scale"), getattr(self, f"{proj}_offset")
            return kernels.gemv_w8(x, q, s, o, idx=flat, rpt=rpt)
        s, z = getattr(self, f"{proj}_scale"), getattr(self, f"{proj}_zero")
        return kernels.gemv_w4(x, q, s, z, self.q[proj][0].in_features, idx=flat, rpt=rpt)

    def _few(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """CPU, a few pairs (decode): grouped by expert in Python; each hit expert runs once on its rows."""
        T, k = idx.shape
        ids = idx.tolist()
        if T == 1 and not self.q and cpu_linear.usable(self.gate_up_proj, 1):
            return self._one_row_c(x, ids[0])  # [k, H]
        native = None  # for an expert with one row: per projection, torch's GEMV rather than oneDNN's (timed)
        if not self.q and x.dtype != torch.float32:
            native = (cpu_native_gemv(self.gate_up_proj), cpu_native_gemv(self.down_proj))
        if T == 1:  # each chosen expert sees the one row: results in slot order, the SwiGLU once for all
            return self._one_row(x, ids[0], native)  # [k, H]
        groups: dict[int, list[int]] = {}
        for p, e in enumerate(e for row in ids for e in row):
            groups.setdefault(e, []).append(p)
        y = x.new_empty(T * k, x.shape[1])
        for e, pairs in groups.items():
            rows = torch.tensor([p // k for p in pairs])
            y[torch.tensor(pairs)] = self._expert(e, x[rows], native=native if len(pairs) == 1 else None)
        return y  # [T*k, H] in (token, slot) order

    def _one_row_c(self, x: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """x [1, H] through the bf16 experts `ids` -> [k, H]: one C call per projection for all k experts
        (layers/cpu_gemv.c), one SwiGLU."""
        gu = cpu_linear.gemv_bf16(self.gate_up_proj, x, ids).to(x.dtype)  # [k, 1, 2I]
        h = _swiglu(gu.view(len(ids), -1), self.inter)  # [k, I]
        return cpu_linear.gemv_bf16(self.down_proj, h.unsqueeze(1), ids, shared=False).to(x.dtype).squeeze(1)

    def _one_row(self, x: torch.Tensor, ids: list[int], native: tuple[bool, bool] | None) -> torch.Tensor:
        """x [1, H] through each of the experts `ids` -> [k, H]: k GEMVs per projection, one SwiGLU."""
        on = torch.backends.mkldnn.enabled
        with _onednn(on and not (native and native[0])):
            if self.q:
                gu = torch.cat([self.q["gate_up_proj"][e](x) for e in ids])  # [k, 2I]
            else:
                gu = torch.cat([F.linear(x, self.gate_up_proj[e]) for e in ids])
        h = _swiglu(gu, self.inter)  # [k, I]
        with _onednn(on and not (native and native[1])):
            if self.q:
                return torch.cat([self.q["down_proj"][e](h[j : j + 1]) for j, e in enumerate(ids)])
            return torch.cat([F.linear(h[j : j + 1], self.down_proj[e]) for j, e in enumerate(ids)])

    def _grouped(self, x: torch.Tensor, idx: torch.Tensor, stream: bool = False) -> torch.Tensor:
        flat, k = idx.reshape(-1), idx.shape[1]
        experts, order = torch.sort(flat, stable=True)  # (token, slot) pairs grouped by expert
        hit, counts = torch.unique_consecutive(experts, return_counts=True)
        xs = x[order // k]  # [T*k, H], rows of each expert together
        ys = torch.empty_like(xs)
        start = 0
        for e, n in zip(hit.tolist(), counts.tolist(), strict=True):  # only the experts that got tokens
            ys[start : start + n] = self._expert(e, xs[start : start + n], x.device if stream else None)
            start += n
        y = torch.empty_like(ys)
        y[order] = ys
        return y  # [T*k, H] in (token, slot) order

    def _expert(
        self, e: int, x: torch.Tensor, to: torch.device | None = None, native: tuple[bool, bool] | None = None
    ) -> torch.Tensor:  # [n, H]
        """Expert e on rows x. to: copy its weights to that device first (streamed). native: per projection,
        oneDNN off for its GEMV (cpu_native_gemv)."""
        if to is not None:  # streamed: this expert's weights copied to x's device
            h = _swiglu(F.linear(x, self.gate_up_proj[e].to(to, non_blocking=True)), self.inter)
            return F.linear(h, self.down_proj[e].to(to, non_blocking=True))
        if self.q:
            return self.q["down_proj"][e](_swiglu(self.q["gate_up_proj"][e](x), self.inter))
        if native is None:
            return F.linear(_swiglu(F.linear(x, self.gate_up_proj[e]), self.inter), self.down_proj[e])
        on = torch.backends.mkldnn.enabled
        with _onednn(on and not native[0]):
            h = _swiglu(F.linear(x, self.gate_up_proj[e]), self.inter)
        with _onednn(on and not native[1]):
            return F.linear(h, self.down_proj[e])

    @torch.no_grad()
    def quantize_(self, attr: str, bits: int, work: torch.device | None, device: torch.device | str) -> None:
        """Replace the stacked weight `attr` (read into CPU memory) by its quantized tensors, stacked over the
        experts on `device` (parameters `<attr>_qweight`, ...), and one quantized linear per expert viewing
        them. On the CPU the int4 weights keep only torch's kernel layout (no dense bf16 copy: an expert sees
        few rows per step). Each expert is quantized straight into its slice: the transients are one expert's."""
        from spillover.quant.isq import quantize_linear

        stacked = getattr(self, attr)  # [E, out, in]
        on_cpu = torch.device(device).type == "cpu"
        held: dict[str, torch.Tensor] = {}
        mods = []
        for e in range(self.num_experts):
            lin = nn.Linear(stacked.shape[2], stacked.shape[1], bias=False, device="meta")
            lin.weight = nn.Parameter(stacked[e], requires_grad=False)
            q = quantize_linear(lin, bits, on_cpu, work, device)
            if getattr(q, "dense", None) is not None:
                q.dense = None
            for name, t in list(q.named_parameters(recurse=False)):
                if name not in held:
                    held[name] = torch.empty((self.num_experts, *t.shape), dtype=t.dtype, device=t.device)
                held[name][e].copy_(t)
                setattr(q, name, nn.Parameter(held[name][e], requires_grad=False))  # a view of the stack
            mods.append(q)
        delattr(self, attr)
        for name, t in held.items():
            self.register_parameter(f"{attr}_{name}", nn.Parameter(t, requires_grad=False))
        self.q[attr] = mods


def _swiglu(gu: torch.Tensor, inter: int) -> torch.Tensor:
    gate, up = gu.split(inter, dim=-1)
    return F.silu(gate) * up
