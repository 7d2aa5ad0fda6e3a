"""spillover: LLM inference with automatic, memory-aware device mapping."""

from __future__ import annotations

__version__ = "0.1.0"

from spillover.config import AutoDeviceMapParams
from spillover.placement.device_map import DeviceMap

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "DeviceMap", "AutoDeviceMapParams", "__version__"]


def __getattr__(name: str):  # lazy: importing spillover must not import torch for `spillover plan`
    if name == "LLM":
        from spillover.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from spillover.engine.async_engine import AsyncLLM

        return AsyncLLM
    if name == "SamplingParams":
        from spillover.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
