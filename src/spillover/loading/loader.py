"""Materialise a model on the devices of a DeviceMap: build it on the meta device, then load each
parameter straight onto its device (one checkpoint tensor in memory at a time, never the whole model twice).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from spillover.errors import ModelLoadError
from spillover.loading.source import ModelSource
from spillover.models import model_class
from spillover.models.base import CausalLM
from spillover.placement.device_map import DeviceMap
from spillover.quant.formats import ISQ_HEAD_BITS
from spillover.quant.gguf_native import trim_heap

log = logging.getLogger(__name__)

STACKED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
"""Parameters of layers/moe.Experts: ISQ quantizes them per expert (`Experts.quantize_`)."""
LM_HEAD_PARAM = "lm_head.weight"
"""With ISQ, this parameter, when untied, is stored int8 (quant/formats.ISQ_HEAD_BITS)."""


def param_device(name: str, dmap: DeviceMap, arch: type[CausalLM] = CausalLM) -> str:
    """Where a parameter is loaded: its stage's device. A streamed layer's weights go to CPU memory
    (engine/offload.py pins them when it packs each layer into one buffer), not to the GPU it runs on."""
    return dmap.stage_weight_device(arch.stage_of(name))


def build_model(
    src: ModelSource, dmap: DeviceMap, dtype: torch.dtype, progress: bool = True, isq: int | None = None,
    native: bool = False,
) -> CausalLM:  # fmt: skip
    """Build the model for `src` with every parameter on the device `dmap` gives it, in `dtype`.

    With `isq`, each decoder layer's projections are quantized as soon as that layer is loaded. With `native`
    (a GGUF's default mode), CPU-resident weights that a CPU kernel reads as the file stores them are kept so
    (quant/gguf_native.py) instead of being dequantized."""
    cfg = src.config
    if dmap.num_layers != cfg.num_hidden_layers:
        raise ModelLoadError(
            f"device map has {dmap.num_layers} layers but the model has {cfg.num_hidden_layers}"
        )
    arch = model_class(cfg.model_type)
    with torch.device("meta"), _no_init():
        model = arch(cfg)
    missing = [
        n for n, _ in model.named_parameters() for s in arch.param_sources(n, cfg) if s not in src.tensors
    ]
    if missing:
        tower = src.mmproj and all(arch.stage_of(n) == "vision" for n in missing)
        raise ModelLoadError(
            f"{src.mmproj if tower else src.path} lacks tensors the model needs: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    params = list(model.named_parameters())
    shared: dict[tuple[str, str], torch.Tensor] = {}  # (source, device) -> tensor, for tied embeddings
    tables: dict[tuple[str, str], nn.Module] = {}  # the same for a GGUF's tables kept quantized on a GPU
    with _progress(progress, len(params), f"loading {src.name}") as advance, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, p in params:
            dev = param_device(name, dmap, arch)
            # ISQ projections are read into CPU memory and quantized in chunks on the way to their device,
            # so no device holds a full-precision projection (the plan counts only the chunks)
            sources = arch.param_sources(name, cfg)
            quantize = bool(isq) and name.startswith("layers.") and name.endswith("_proj.weight")
            head = bool(isq) and name == LM_HEAD_PARAM and sources == [name]
            quantize = quantize or head  # an untied lm_head: isq 8 (quant/formats.ISQ_HEAD_BITS)
            stacked = bool(isq) and name.endswith(
                STACKED_EXPERTS
            )  # 3-D expert weights: one linear per expert
            quantize = quantize or stacked
            load_dev = "cpu" if quantize else dev
            if native and not quantize:
                from spillover.quant.gguf_gpu import gpu_module
                from spillover.quant.gguf_native import native_module

                path = name.rpartition(".")[0]
                module = model.get_submodule(path)
                if dev == "cpu":
                    kept = native_module(src, name, sources, arch, module, dtype)
                else:  # Q4 projections stay 4-bit on a GPU too (its kernels' plain layout)
                    kept = gpu_module(src, name, sources, arch, module, dev, tables)
                if kept is not None:  # the module replaces the one that holds this parameter
                    parent, _, attr = path.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, attr, kept)
                    src.drop_pages()  # the blocks just read were copied out: keep the peak at one tensor's
                    trim_heap()  # and the repacking's transients
                    advance()
                    continue
            key = (sources[0], dev)
            if len(sources) == 1 and key in shared:
                t = shared[key]
            else:
                parts = [src.load(s, load_dev, dtype) for s in sources]
                t = arch.from_checkpoint(name, parts[0] if len(parts) == 1 else torch.cat(parts, dim=0))
                if t.dim() != p.dim() and t.numel() == p.numel():  # stacked experts: [E*2I, H] -> [E, 2I, H]
                    t = t.reshape(p.shape)
                if tuple(t.shape) != tuple(p.shape):
                    raise ModelLoadError(
                        f"tensor for {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                    )
                copy = t.device.type == "cpu" and load_dev == "cpu" and not _owns(t) and not quantize
                t = t.to(device=load_dev, dtype=dtype, copy=copy)
                if len(sources) == 1 and not quantize:  # a quantized original must not outlive its layer
                    shared[key] = t
            _set_param(model, name, nn.Parameter(t, requires_grad=False))
            advance()
            if quantize:
                from spillover.quant.isq import quantize_linear

                if stacked:
                    owner, _, attr = name.rpartition(".")
                    model.get_submodule(owner).quantize_(attr, isq, _work_device(dev, dmap), dev)
                    continue
                path = name.rpartition(".")[0]
                parent, _, attr = path.rpartition(".")
                lin = model.get_submodule(path)
                if head:
                    work = _work_device(dev, dmap)
                    setattr(model, attr, quantize_linear(lin, ISQ_HEAD_BITS, dev == "cpu", work, dev))
                    continue
                i = int(name.split(".")[1])  # each projection as soon as it is loaded
                # a CPU layer keeps a dense copy for prompts unless they are streamed to a GPU (formats.py)
                on_cpu = dmap.layers[i] == "cpu"
                q = quantize_linear(lin, isq, on_cpu, _work_device(dev, dmap), dev, dmap.stream_gpu() is None)
                setattr(model.get_submodule(parent), attr, q)
                if dev == "cpu":  # the full-precision projection and the transients, back to the OS
                    del lin, t
                    trim_heap()
    _expert_streaming(model, dmap)
    if "cpu" in (*dmap.layers, dmap.head):  # bf16 linears computed there take the C GEMV at decode
        from spillover.layers.cpu_linear import use_cpu_gemv_

        use_cpu_gemv_(model)
    if native:
        src.drop_pages()  # the tensors dequantized as usual were copied out too
    model.eval()
    return model


def _expert_streaming(model: nn.Module, dmap: DeviceMap) -> None:
    """MoE: experts held in CPU memory for GPU layers copy the hit experts to the GPU for steps the cost model
    says are cheaper that way (long prefills; placement/cost_model.expert_stream_pairs), from page-locked
    memory."""
    from spillover.layers.moe import Experts
    from spillover.placement.cost_model import Bandwidths, expert_stream_pairs

    for i in dmap.split_experts():
        for m in model.layers[i].modules():
            if isinstance(m, Experts) and dmap.layers[i] != "cpu":
                pinned = m.pin_()  # the copies at pinned bandwidth (in place; pageable where not done)
                params = 3 * m.inter * m.hidden
                m.stream_pairs = expert_stream_pairs(params, m.num_experts, Bandwidths(), pinned=pinned)


def _work_device(dev: str, dmap: DeviceMap) -> torch.device | None:
    """Where ISQ quantizes a weight bound for `dev`: that device if it is a GPU, a GPU of the map for
    CPU-resident weights (much faster than the CPU; the transients are small, quant/formats.py), else the CPU."""
    if dev != "cpu":
        return torch.device(dev)
    gpus = [d for d in dmap.devices() if d != "cpu"]
    return torch.device(gpus[0]) if gpus and torch.cuda.is_available() else None


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip the random initialisation of Linear/Embedding while building on the meta device: every
    parameter is replaced by checkpoint data anyway, and a meta-device normal_() costs ~1.4 s of lazy torch
    imports on first use (measured on SmolLM2: LLM() 2.9 s -> 1.5 s)."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None  # type: ignore[method-assign]
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn  # type: ignore[method-assign]


def _owns(t: torch.Tensor) -> bool:
    """False for tensors that view a read-only memory map (f32 GGUF tensors): those must be copied."""
    return t.untyped_storage().resizable()


def _set_param(model: nn.Module, name: str, p: nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(mod_name) if mod_name else model, attr, p)


class _progress:
    """A rich progress bar when stderr is a terminal; silent otherwise."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label
        self.bar: Any = None

    def __enter__(self):
        import sys

        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TimeElapsedColumn

            self.bar = Progress("[progress.description]{task.description}", BarColumn(), "{task.completed}/{task.total}",
                                TimeElapsedColumn(), transient=True)  # fmt: skip
            self.bar.start()
            task = self.bar.add_task(self.label, total=self.total)
            return lambda: self.bar.advance(task)
        return lambda: None

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
