"""Mixtral: the modules of the architecture models/arch/mixtral.py describes, which are Qwen3-MoE's
(models/qwen3_moe.py: attention, a router, stacked experts); only the checkpoint names differ."""

from __future__ import annotations

from spillover.models.arch.mixtral import Mixtral
from spillover.models.qwen3_moe import MoECausalLM


class MixtralForCausalLM(Mixtral, MoECausalLM):
    """Mixtral: its description (checkpoint names, config) on the shared MoE modules."""


MODEL = MixtralForCausalLM
