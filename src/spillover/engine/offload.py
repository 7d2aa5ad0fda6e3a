"""Running layers whose weights live in CPU memory: streamed to a GPU, or computed on the CPU.

A transform on a built model, not branches in model code. `OffloadExecutor` replaces the runner's layer
loop when the DeviceMap spills to the CPU:

- A streamed layer (DeviceMap.streamed) keeps its weights in one pinned host buffer. `WeightStreamer`
  copies them into one of STREAM_BUFFERS GPU staging buffers on a side CUDA stream, ahead of use, and the
  layer runs on the GPU with its parameters swapped for views into that buffer. Events order everything:
  the compute stream waits for "copy done", the copy stream waits for "last use done" before overwriting a
  buffer; nothing calls torch.cuda.synchronize. The swap is `torch.func.functional_call`: the module keeps
  its own (pinned host) parameters. Prefetch is cyclic: after layer j runs, the layer after the
  next one in the streaming order starts loading into the buffer j freed, wrapping around to the first
  streamed layers of the next step, so those load during the head, sampling and the GPU-resident layers.
- A CPU-computed layer runs on the CPU, its KV cache in CPU memory. Its weights are pinned too, so for a
  step of many tokens (long prefill; `gpu_prefill_tokens` from the cost model) it is streamed like the
  others: the K/V it attends to are gathered from the CPU cache into a small GPU window, and the new K/V
  written back to the CPU cache after the step. The split is fixed at load time; only this per-step
  promotion changes with the phase, and the KV cache of every layer stays where the plan says.
- Hidden states cross to the CPU with a copy the CPU waits for (it needs the values; that waits on the
  compute stream only, never on the copy stream) and back with a non-blocking copy.

On a machine without CUDA the streamer works synchronously with a CPU "device", so its bookkeeping (packing,
buffer rotation, parameter swaps, KV window) is tested on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spillover.layers.attention import AttnMeta
from spillover.models.base import LayerInput
from spillover.placement.cost_model import PAGEABLE_H2D_FRACTION, Bandwidths, gpu_prefill_tokens, step_seconds
from spillover.placement.device_map import DeviceMap
from spillover.placement.estimate import STREAM_BUFFERS
from spillover.placement.resolve import machine_bandwidths
from spillover.quant.isq import layer_params

log = logging.getLogger(__name__)

ALIGN = 512
"""Byte alignment of each parameter inside a packed layer buffer (cuBLAS likes 256-byte aligned operands)."""


@dataclass
class _Slot:
    name: str  # dotted, relative to the layer
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Pack:
    """One layer's parameters in one flat (pinned) host buffer: one large copy per layer."""

    host: torch.Tensor  # uint8 [nbytes]
    slots: list[_Slot]
    params: list[nn.Parameter]  # the host-side parameters (views into `host`)


def _pack_layer(layer: nn.Module, pin: bool) -> _Pack:
    named = list(layer.named_parameters())
    slots, off = [], 0
    for n, p in named:
        nbytes = p.numel() * p.element_size()
        slots.append(_Slot(n, off, nbytes, tuple(p.shape), p.dtype))
        off += -(-nbytes // ALIGN) * ALIGN
    host = torch.empty(off, dtype=torch.uint8, pin_memory=pin)
    params = []
    for (n, p), s in zip(named, slots, strict=True):
        view = _view(host, s)
        view.copy_(p.detach())
        q = nn.Parameter(view, requires_grad=False)
        owner, _, attr = n.rpartition(".")
        # the pinned copy replaces the loaded one (freed): CPU compute reads it too
        setattr(layer.get_submodule(owner) if owner else layer, attr, q)
        params.append(q)
    return _Pack(host, slots, params)


def _view(flat: torch.Tensor, s: _Slot) -> torch.Tensor:
    return flat[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)


class WeightStreamer:
    """Pinned host copies of some layers' weights and `buffers` GPU staging buffers they rotate through."""

    def __init__(
        self, layers: nn.ModuleList, ids: Sequence[int], device: torch.device, buffers: int = STREAM_BUFFERS
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.packs = {i: _pack_layer(layers[i], pin=self.cuda) for i in ids}
        size = max((p.host.numel() for p in self.packs.values()), default=0)
        n = max(1, min(buffers, len(self.packs)))
        self.staging = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(n)]
        self.holds: list[int | None] = [None] * n  # layer held (or being loaded) by each buffer
        self.next = 0  # round-robin victim
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready = [torch.cuda.Event() if self.cuda else None for _ in range(n)]
        self.done = [torch.cuda.Event() if self.cuda else None for _ in range(n)]
        self.copies = 0  # layers copied so far (tests and benchmarks read it)
        self.bytes_copied = 0

    @property
    def pinned_bytes(self) -> int:
        return sum(p.host.numel() for p in self.packs.values())

    def prefetch(self, i: int) -> int:
        """Start loading layer i into a staging buffer (no-op when one holds it). Returns the buffer."""
        if i in self.holds:
            return self.holds.index(i)
        b = self.next
        self.next = (b + 1) % len(self.staging)
        self.holds[b] = i
        src, dst = self.packs[i].host, self.staging[b][: self.packs[i].host.numel()]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.done[b])  # the last layer computed from it has finished
                dst.copy_(src, non_blocking=True)
                self.ready[b].record(self.copy_stream)
        else:
            dst.copy_(src)
        self.copies += 1
        self.bytes_copied += src.numel()
        return b

    def run(self, i: int, layer: nn.Module, *args: Any) -> torch.Tensor:
        """layer(*args) (layer i) computed with its parameters in a staging buffer."""
        b = self.prefetch(i)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[b])
        params = {s.name: _view(self.staging[b], s) for s in self.packs[i].slots}
        try:
            return torch.func.functional_call(layer, params, args)
        finally:
            if self.cuda:
                self.done[b].record(torch.cuda.current_stream(self.device))


class OffloadExecutor:
    """The layer loop for a DeviceMap with CPU-resident layers (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        dmap: DeviceMap,
        gpu: str | torch.device | None = None,
        gpu_prefill_tokens: int | None = None,
        buffers: int = STREAM_BUFFERS,
        bandwidths: Bandwidths | None = None,
    ) -> None:
        self.dmap = dmap
        # with `bandwidths`, a step past the threshold is promoted only when the cost model, counting the K/V
        # windows the promoted layers copy from CPU memory, says it pays (`_window_pays`)
        self.bw = bandwidths
        self.sizes = layer_bytes(model) if bandwidths is not None else []
        self.params = [layer_params(layer) for layer in model.layers] if bandwidths is not None else []
        self.cpu_layers = [i for i in dmap.layers_on("cpu") if i not in dmap.streamed]
        gpus = [d for d in dmap.devices() if d != "cpu"]
        self.gpu = torch.device(gpu or dmap.stream_gpu() or (gpus[0] if gpus else "cpu"))
        # CPU-computed layers are streamed for long prefills only when the map streams (every step, or for
        # prompts: `DeviceMap.prefill_stream`; the planner then reserved the buffers and the KV window) and a
        # threshold was given
        self.promote_at = gpu_prefill_tokens if dmap.stream_gpu() and self.cpu_layers else None
        ids = list(dmap.streamed) + (self.cpu_layers if self.promote_at is not None else [])
        self.streamer = WeightStreamer(model.layers, sorted(ids), self.gpu, buffers) if ids else None
        self.steps = {"split": 0, "promoted": 0}

        self.owned = set(dmap.streamed) | set(self.cpu_layers)
        self.first = min(self.owned, default=-1)
        self.last = max(self.owned, default=-1)
        self._step: _Step | None = None

    def owns(self, a: int, b: int) -> bool:
        """Whether layers a..b-1 (one runner segment) are CPU-resident, so this executor runs them."""
        return any(i in self.owned for i in range(a, b))

    def order(self, promoted: bool) -> list[int]:
        """The layers streamed in one step, in execution order."""
        if promoted:
            return sorted((*self.dmap.streamed, *self.cpu_layers))
        return list(self.dmap.streamed)

    def _begin(self, tokens: int, ctx_for: ContextFor) -> _Step:
        promoted = self.promote_at is not None and tokens >= self.promote_at
        promoted = promoted and (self.bw is None or self._window_pays(tokens, ctx_for))
        self.steps["promoted" if promoted else "split"] += 1
        order = self.order(promoted)
        nxt: dict[int, int] = {}
        if self.streamer is not None and order:
            k = len(self.streamer.staging)
            nxt = {layer: order[(j + k) % len(order)] for j, layer in enumerate(order)}
            for layer in order[:k]:
                self.streamer.prefetch(layer)
        windows = None
        if promoted:
            cpu, gpu = ctx_for("cpu"), ctx_for(str(self.gpu))
            windows = {g: _KVWindow(cpu.metas[g], gpu.metas[g], self.gpu) for g in gpu.metas}
        return _Step(nxt, windows)

    def _window_pays(self, tokens: int, ctx_for: ContextFor) -> bool:
        """Whether streaming the CPU-computed layers beats computing them on the CPU in this step, counting
        what `promoted` costs beyond the weights: each promoted layer gathers the step's K/V window in CPU
        memory and copies it (pageable) to the GPU. A decode step's window is every sequence's whole context
        (8 x 8k tokens: 256 MiB a Llama-3-8B layer), a prompt chunk's its own past."""
        cpu = ctx_for("cpu")
        k = cpu.layer_input(self.cpu_layers[0]).k_cache  # [slots, kv_heads, hd]
        per_slot = 2 * k[0].numel() * k.element_size()
        slots = max(_window_slots(m) for m in cpu.metas.values())
        window = slots * per_slot * len(self.cpu_layers)
        bw, gb = self.bw, 1e9
        assert bw is not None
        copy = window / (bw.pinned_h2d_gbps * PAGEABLE_H2D_FRACTION * gb) + window / (bw.host_mem_gbps * gb)
        everything = self.order(True)
        promoted = step_seconds(self.sizes, everything, (), tokens, bw, self.params).seconds + copy
        split = step_seconds(self.sizes, self.dmap.streamed, self.cpu_layers, tokens, bw, self.params).seconds
        return promoted < split

    def run(
        self, layers: nn.ModuleList, x: torch.Tensor, a: int, b: int, ctx_for: ContextFor
    ) -> torch.Tensor:
        """Run layers a..b-1 (a runner segment this executor owns); hidden states come in on any device.
        `ctx_for(device)`: the step's StepContext (engine/step.py) on that device."""
        if a <= self.first or self._step is None:
            self._step = self._begin(x.shape[0], ctx_for)
        step = self._step
        for i in range(a, b):
            x = self._layer(layers[i], i, x, step, ctx_for)
        if b > self.last:  # the step's last CPU-resident layer
            for w in (step.windows or {}).values():
                w.flush()
            self._step = None
            if b == self.dmap.num_layers:
                x = hop(x, self.dmap.head)
        return x

    def _layer(
        self, layer: nn.Module, i: int, x: torch.Tensor, step: _Step, ctx_for: ContextFor
    ) -> torch.Tensor:
        streamed = i in step.nxt
        dev = str(self.gpu) if streamed else self.dmap.layers[i]
        x = hop(x, dev)
        li = ctx_for(dev).layer_input(i)
        if not streamed:
            return layer(x, li)
        window = None
        if i in self.cpu_layers:  # promoted: K/V through a GPU window over its CPU cache
            window = step.windows[ctx_for("cpu").caches.specs[i].kv.sliding_window]
            k_cpu, v_cpu = li.k_cache, li.v_cache
            li = window.input(li.cos, li.sin, k_cpu, v_cpu)
        x = self.streamer.run(i, layer, x, li)
        if window is not None:
            window.write_back(li, k_cpu, v_cpu)
        self.streamer.prefetch(step.nxt[i])  # cyclic: wraps to the next step's first streamed layers
        return x


ContextFor = Callable[[str], Any]  # device -> engine.step.StepContext


@dataclass
class _Step:
    nxt: dict[int, int]  # streamed layer -> layer to prefetch into its buffer once it has run
    windows: dict[int | None, _KVWindow] | None  # per KV group, when CPU-computed layers are promoted


def _window_slots(m: AttnMeta) -> int:
    """Cache slots a step's K/V window holds for one KV group (at most: `_KVWindow` drops repeats)."""
    n = m.slot_mapping.numel() + (m.decode_slots.numel() if m.decode_slots is not None else 0)
    return n + sum(p.slots.numel() for p in m.prefills if p.slots is not None)


def hop(x: torch.Tensor, device: str) -> torch.Tensor:
    """Move hidden states between devices. To the CPU: a copy the CPU waits for (it reads the values next;
    this waits for the current stream only). To a GPU: non-blocking (torch stages pageable sources)."""
    d = torch.device(device)
    if x.device == d:
        return x
    if d.type == "cpu":
        return x.to(d)
    return x.to(d, non_blocking=True)


class _KVWindow:
    """For a step that runs CPU-computed layers on the GPU: the cache slots the step touches, renumbered
    0..n-1, so each such layer attends over a small GPU window gathered from its CPU cache, and its new K/V
    go back to the CPU cache. One renumbering per step, shared by all promoted layers."""

    def __init__(self, cpu_meta: AttnMeta, gmeta: AttnMeta, gpu: torch.device) -> None:
        parts = [cpu_meta.slot_mapping]
        if cpu_meta.decode_slots is not None:
            parts.append(cpu_meta.decode_slots.reshape(-1))
        parts += [p.slots for p in cpu_meta.prefills if p.slots is not None]
        self.slots, inv = torch.unique(torch.cat(parts), return_inverse=True)  # CPU: [n], [sum of parts]
        inv = inv.to(gpu, non_blocking=True)
        pieces = list(torch.split(inv, [p.numel() for p in parts]))
        new_slots = pieces.pop(0)
        dec = pieces.pop(0).view_as(gmeta.decode_slots) if gmeta.decode_slots is not None else None
        prefills = []
        for p in gmeta.prefills:
            prefills.append(dataclasses.replace(p, slots=pieces.pop(0)) if p.slots is not None else p)
        self.meta = dataclasses.replace(gmeta, slot_mapping=new_slots, decode_slots=dec, prefills=prefills)
        self.new_local = new_slots  # GPU: where the step's new K/V land in the window
        self.new_global = cpu_meta.slot_mapping  # CPU: where they belong in the CPU cache
        self.gpu = gpu
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.copied: torch.cuda.Event | None = None  # recorded after the last copy to host memory

    def input(
        self, cos: torch.Tensor, sin: torch.Tensor, k_cpu: torch.Tensor, v_cpu: torch.Tensor
    ) -> LayerInput:
        k = k_cpu.index_select(0, self.slots).to(self.gpu, non_blocking=True)  # [n, kv_heads, hd]
        v = v_cpu.index_select(0, self.slots).to(self.gpu, non_blocking=True)
        return LayerInput(cos, sin, self.meta, k, v)

    def write_back(self, li: LayerInput, k_cpu: torch.Tensor, v_cpu: torch.Tensor) -> None:
        """Start copying this layer's new K/V to host memory; `flush` puts them in the CPU cache. They leave the
        GPU now: held there until the step's end, a 2048-token chunk kept 8 MiB per promoted layer of an 8B
        (23 layers at a 4 GiB budget), which the plan does not count."""
        pin = self.gpu.type == "cuda"
        host = []
        for cache in (li.k_cache, li.v_cache):
            new = cache.index_select(0, self.new_local)  # [n, kv_heads, hd] on the GPU, freed on return
            h = torch.empty(new.shape, dtype=new.dtype, pin_memory=pin)
            host.append(h.copy_(new, non_blocking=pin))
        self.pending.append((host[0], host[1], k_cpu, v_cpu))
        if pin:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def flush(self) -> None:
        """Put the new K/V of every promoted layer into its CPU cache (once per step: one wait)."""
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        for k_new, v_new, k_cpu, v_cpu in self.pending:
            k_cpu.index_copy_(0, self.new_global, k_new)
            v_cpu.index_copy_(0, self.new_global, v_new)
        self.pending.clear()


def needs_executor(dmap: DeviceMap) -> bool:
    """Whether the map spills to the CPU next to a GPU (the plain loop suffices otherwise)."""
    gpu = dmap.stream_gpu() or next((d for d in dmap.devices() if d != "cpu"), None)
    return bool(dmap.streamed) or (bool(dmap.layers_on("cpu")) and gpu is not None)


def layer_bytes(model: nn.Module) -> list[int]:
    """Weight bytes of each decoder layer, as loaded."""
    return [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.layers]


def make_offload(
    model: nn.Module, dmap: DeviceMap, bandwidths: Bandwidths | None = None
) -> OffloadExecutor | None:
    """The OffloadExecutor a DeviceMap needs (None when the plain loop suffices); the runner calls its `run`
    for the segments it `owns`. The long-prefill threshold comes from the cost model with this machine's
    bandwidths (its cached calibration, else the built-in figures)."""
    if not needs_executor(dmap):
        return None
    bw = bandwidths or machine_bandwidths()
    params = [layer_params(layer) for layer in model.layers]  # FLOPs of quantized layers too
    threshold = gpu_prefill_tokens(
        layer_bytes(model), dmap.streamed, dmap.layers_on("cpu"), bw, layer_params=params
    )
    log.info(
        "offload: %d layers streamed, %d computed on the CPU (CPU layers streamed too from %s tokens per step)",
        len(dmap.streamed), len(dmap.layers_on("cpu")), threshold,
    )  # fmt: skip
    return OffloadExecutor(model, dmap, gpu_prefill_tokens=threshold, bandwidths=bw)


__all__ = ["OffloadExecutor", "WeightStreamer", "hop", "layer_bytes", "make_offload", "needs_executor"]
