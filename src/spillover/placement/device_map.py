"""The DeviceMap: where every part of a model lives.

A DeviceMap names a device ("cuda:0", "cuda:1", "mps", "cpu") for the embeddings, for each decoder layer,
and for the head (final norm + lm_head). Layers on one device form one contiguous range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeviceMap:
    layers: tuple[str, ...]  # device of each decoder layer, index = layer number
    embed: str  # token embeddings
    head: str  # final norm + lm_head
    vision: str | None = None  # vision tower + projector (vision models only)
    # where each CPU-resident layer runs: "cpu" (compute on CPU) or a GPU it is streamed to
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def single(cls, device: str, num_layers: int) -> DeviceMap:
        return cls(layers=(device,) * num_layers, embed=device, head=device)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def devices(self) -> list[str]:
        """Distinct devices in the order the forward pass visits them."""
        seen: list[str] = []
        for d in (self.embed, *self.layers, self.head):
            if d not in seen:
                seen.append(d)
        return seen

    def layers_on(self, device: str) -> list[int]:
        return [i for i, d in enumerate(self.layers) if d == device]

    def is_single_device(self) -> bool:
        return len(self.devices()) == 1

    def to_dict(self) -> dict[str, Any]:
        return {"embed": self.embed, "layers": list(self.layers), "head": self.head, "vision": self.vision}

    def summary(self) -> str:
        """One line, e.g. 'cuda:0: layers 0-13 (+embed); cpu: layers 14-31 (+head)'."""
        parts = []
        for dev in self.devices():
            idx = self.layers_on(dev)
            s = f"{dev}: "
            s += f"layers {idx[0]}-{idx[-1]}" if len(idx) > 1 else (f"layer {idx[0]}" if idx else "no layers")
            extra = [n for n, d in (("embed", self.embed), ("head", self.head)) if d == dev]
            if extra:
                s += f" (+{', '.join(extra)})"
            parts.append(s)
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.summary()
