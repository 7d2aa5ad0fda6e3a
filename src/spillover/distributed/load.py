"""Build one rank's shard: the model on the meta device, the sharding transform, then each parameter loaded
from its slices of the checkpoint, straight onto the rank's device (ISQ per layer as soon as it is loaded)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from spillover import models
from spillover.distributed.shard import Collectives, ShardSpec, loaded_name, param_slices, shard_model
from spillover.distributed.slices import SliceReader
from spillover.errors import ModelLoadError


def build_sharded(
    src, spec: ShardSpec, comm: Collectives, device: str, dtype: torch.dtype, isq: int | None = None
) -> nn.Module:  # noqa: ANN001
    cfg = src.config
    arch, param_sources, from_checkpoint = architecture(cfg.model_type)
    from spillover.loading.loader import _no_init, _set_param

    with torch.device("meta"), _no_init():
        model = arch(cfg)
    shard_model(model, spec, comm)
    reader = SliceReader(src)
    params = list(model.named_parameters())
    last_of_layer = {n.split(".")[1]: n for n, _ in params if n.startswith("layers.")}
    cache: dict[tuple, torch.Tensor] = {}  # tied embeddings: the same slice serves embed and head
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, p in params:
            plain = loaded_name(name)
            sources = param_sources(plain, cfg)
            missing = [s for s in sources if s not in src.tensors]
            if missing:
                raise ModelLoadError(f"{src.path} lacks tensors the model needs: {', '.join(missing)}")
            slices = param_slices(plain, sources, cfg, spec)
            key = tuple(slices)
            t = cache.get(key)
            if t is None:
                parts = [reader.read(s, device, dtype) for s in slices]
                t = from_checkpoint(plain, parts[0] if len(parts) == 1 else torch.cat(parts, dim=0))
                if len(slices) == 1:
                    cache[key] = t
            if tuple(t.shape) != tuple(p.shape):
                raise ModelLoadError(
                    f"slice for {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                )
            if not t.untyped_storage().resizable():  # a view of a read-only mapping
                t = t.clone()
            _set_param(model, name, nn.Parameter(t, requires_grad=False))
            if isq and name.startswith("layers.") and last_of_layer[name.split(".")[1]] == name:
                from spillover.quant.isq import quantize_layer

                quantize_layer(model.layers[int(name.split(".")[1])], isq, on_cpu=device == "cpu")
            if isq and plain == "lm_head.weight" and sources == [plain]:  # untied: isq 8, as the plan
                from spillover.quant.formats import ISQ_HEAD_BITS
                from spillover.quant.isq import quantize_linear

                head = model.lm_head
                head.linear = quantize_linear(head.linear, ISQ_HEAD_BITS, device == "cpu")
    model.eval()
    return model


def architecture(model_type: str) -> tuple:
    """(class, param_sources, from_checkpoint) of an architecture (the model contract, models/arch/base.py)."""
    cls = models.model_class(model_type)
    return cls, cls.param_sources, cls.from_checkpoint
