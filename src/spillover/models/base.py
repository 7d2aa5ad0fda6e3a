"""The model contract, its module half: `CausalLM`, the nn.Module base every architecture's model class builds on.

An architecture is a description (`models/arch/<name>.py`: config, checkpoint tensors, GGUF names, KV specs,
stages; no torch; models/arch/base.py lists the class methods) and one `CausalLM` subclass in
`models/<name>.py` that inherits that description and adds the modules. At run time a model is three kinds
of stage: `embed(ids)`, `layers[i](x, LayerInput)`, `head(x)`. Executors (engine/) decide where and how each
stage runs; the model never knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spillover.config import ModelConfig
from spillover.layers.attention import AttnMeta
from spillover.models.arch.base import Architecture


@dataclass
class LayerInput:
    """What one layer needs besides the hidden states; built by the runner per step, shared by the layers of
    one device that have the same LayerSpec."""

    cos: torch.Tensor  # [T, rot_dim]
    sin: torch.Tensor  # [T, rot_dim]
    meta: AttnMeta
    k_cache: torch.Tensor  # [slots, n_kv, hd]
    v_cache: torch.Tensor
    cross: Any = None  # cross-attention models: per sequence with images, its rows (engine/runner._CrossRows)
    out_rows: Any = None  # the model's last layer: the rows read after it (logits) if fewer than T, else None


class CausalLM(Architecture, nn.Module):
    """Base of every architecture's model: embed -> layers -> head. A subclass inherits its architecture's
    description first (`class LlamaForCausalLM(Llama, CausalLM)`) and fills the forward of each stage."""

    config: ModelConfig
    layers: nn.ModuleList

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] logits
        raise NotImplementedError
