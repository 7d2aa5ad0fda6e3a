"""The DeviceMap: where every part of a model lives; manual maps ("-n 16", "0:16;1:16"); plan rendering.

A DeviceMap names a device ("cuda:0", "cuda:1", "mps", "cpu") for the embeddings, for each decoder layer,
and for the head (final norm + lm_head). Layers on one device form one contiguous range.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from spillover.errors import DeviceMapSyntaxError, UnknownDeviceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceMap:
    layers: tuple[str, ...]  # device of each decoder layer, index = layer number
    embed: str  # token embeddings
    head: str  # final norm + lm_head
    vision: str | None = None  # vision tower + projector (vision models only)
    notes: tuple[str, ...] = field(default=())
    # Layers whose weights live in (pinned) CPU memory but which run on `layers[i]` (a GPU): their weights
    # are streamed to the GPU each step (engine/offload.py). Their KV cache and activations live on the GPU.
    # A CPU-resident layer not listed here has layers[i] == "cpu": it is computed on the CPU, KV cache there.
    streamed: tuple[int, ...] = ()
    # Mixture-of-experts models: the device of each layer's experts stage ("layers.<i>.experts"), which may
    # differ from the layer's (experts in CPU memory, attention on the GPU: the experts are computed on the
    # CPU). Empty: a dense model (or experts always with their layer).
    experts: tuple[str, ...] = ()
    # The GPU that CPU-computed layers are streamed to for long prefills when no layer is streamed every step
    # (its staging buffers and one layer's KV window are kept there): a prompt's chunk on the CPU costs about
    # a second per 8B layer, streamed a few ms. With streamed layers, theirs GPU serves (`stream_gpu`).
    prefill_stream: str | None = None

    @classmethod
    def single(cls, device: str, num_layers: int) -> DeviceMap:
        return cls(layers=(device,) * num_layers, embed=device, head=device)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def devices(self) -> list[str]:
        """Distinct devices in the order the forward pass visits them."""
        seen: list[str] = []
        for d in (self.embed, *self.layers, *self.experts, self.head):
            if d not in seen:
                seen.append(d)
        return seen

    def layers_on(self, device: str) -> list[int]:
        """Layers that run on `device` (their KV cache lives there), streamed ones included."""
        return [i for i, d in enumerate(self.layers) if d == device]

    def weight_device(self, i: int) -> str:
        """Where layer i's weights live: "cpu" for a streamed layer, else the device it runs on."""
        return "cpu" if i in self.streamed else self.layers[i]

    def experts_device(self, i: int) -> str:
        """Where layer i's experts live and are computed (MoE): `experts[i]`, else with the layer."""
        return self.experts[i] if self.experts else self.layers[i]

    def split_experts(self) -> list[int]:
        """Layers whose experts are on another device than the rest of the layer."""
        return [i for i in range(len(self.experts)) if self.experts[i] != self.layers[i]]

    def stage_device(self, stage: str) -> str:
        """Where a stage runs: "embed", "layers.<i>", "layers.<i>.experts", "head", "vision" (models/arch/base.py
        names the stages); the vision tower of a map that does not place it runs with the embeddings."""
        if stage.startswith("layers."):
            i = int(stage.split(".")[1])
            return self.experts_device(i) if stage.endswith(".experts") else self.layers[i]
        if stage == "vision":
            return self.vision or self.embed
        return self.embed if stage == "embed" else self.head

    def stage_weight_device(self, stage: str) -> str:
        """Where a stage's weights are loaded: its device, or "cpu" for a streamed layer."""
        if stage.startswith("layers."):
            i = int(stage.split(".")[1])
            if stage.endswith(".experts") and self.experts and self.experts[i] != self.layers[i]:
                return self.experts[i]
            return self.weight_device(i)
        return self.stage_device(stage)

    def stages(self) -> list[dict[str, str]]:
        """Every stage in forward order with where it runs and where its weights live."""
        names = ["vision"] * (self.vision is not None) + ["embed"]
        for i in range(self.num_layers):
            names += [f"layers.{i}", f"layers.{i}.experts"] if self.experts else [f"layers.{i}"]
        names.append("head")
        return [
            {"stage": n, "device": self.stage_device(n), "weights": self.stage_weight_device(n)}
            for n in names
        ]

    def stream_gpu(self) -> str | None:
        """The GPU that layers are streamed to (every step, or only for long prefills); None: no streaming."""
        return self.layers[self.streamed[0]] if self.streamed else self.prefill_stream

    def cpu_resident(self) -> list[int]:
        """Layers whose weights live in CPU memory: computed on the CPU or streamed to a GPU."""
        return [i for i in range(self.num_layers) if self.weight_device(i) == "cpu"]

    def is_single_device(self) -> bool:
        return len(self.devices()) == 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "embed": self.embed,
            "layers": list(self.layers),
            "head": self.head,
            "vision": self.vision,
            "streamed": list(self.streamed),
            "experts": list(self.experts),
            "prefill_stream": self.prefill_stream,
        }

    def summary(self) -> str:
        """One line, e.g. 'cuda:0: layers 0-13 (+embed); cpu: layers 14-31 (+head)'; with streaming,
        'cuda:0: layers 0-11, streamed from cpu 12-31 (+head)'."""
        parts = []
        for dev in self.devices():
            idx = [i for i in self.layers_on(dev) if i not in self.streamed]
            streamed = [i for i in self.layers_on(dev) if i in self.streamed]
            s = f"{dev}: "
            s += f"layers {idx[0]}-{idx[-1]}" if len(idx) > 1 else (f"layer {idx[0]}" if idx else "no layers")
            if streamed:
                s += f", streamed from cpu {format_layers(streamed)}"
            if self.prefill_stream == dev and not self.streamed:
                s += ", CPU layers streamed for long prompts"
            experts = [i for i in self.split_experts() if self.experts[i] == dev]
            if experts:
                s += f", experts of layers {format_layers(experts)}"
            extra = [
                n
                for n, d in (("vision", self.vision), ("embed", self.embed), ("head", self.head))
                if d == dev
            ]
            if extra:
                s += f" (+{', '.join(extra)})"
            parts.append(s)
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.summary()


# ------------------------------------------------------------------ manual maps

MANUAL_MAP_HELP = (
    '"-n 16" puts 16 layers on GPU 0; "-n \'0:16;1:16\'" puts 16 layers on GPU 0 and the next 16 on GPU 1'
)


def parse_device_layers(
    spec: str | int | list[str] | tuple[str, ...], num_layers: int, visible_gpus: int, gpu_kind: str = "cuda"
) -> DeviceMap:
    """A manual map -> DeviceMap. Raises DeviceMapSyntaxError / UnknownDeviceError naming the fault.

    spec: "16" or 16 (layers on GPU 0), "0:16;1:16" (ordinal:count, ";"-separated) or the SDK list form
    ["0:16", "1:16"]. Layers are given out in the order written, from layer 0; layers not covered go to the
    CPU. visible_gpus: how many GPUs this process sees (after CUDA_VISIBLE_DEVICES). gpu_kind: "cuda", or
    "mps" (one GPU, ordinal 0, named "mps").

    Embeddings go with layer 0 (the first hop is then free); the head goes with the last GPU layer, so the
    lm_head matmul runs on a GPU whenever the map uses one, else on the CPU.
    """
    entries = _split_entries(spec)
    counts = [_parse_entry(e, bare=len(entries) == 1) for e in entries]
    _check_ordinals(counts, visible_gpus, gpu_kind)
    total = sum(n for _, n in counts)
    if total > num_layers:
        raise DeviceMapSyntaxError(
            f"device map {_show(spec)} asks for {total} layers on GPUs but the model has only {num_layers}"
        )
    layers: list[str] = []
    for ordinal, n in counts:
        layers += [_gpu_name(gpu_kind, ordinal)] * n
    layers += ["cpu"] * (num_layers - total)
    gpu_layers = [d for d in layers if d != "cpu"]
    head = gpu_layers[-1] if gpu_layers else "cpu"
    embed = layers[0] if layers else "cpu"
    return DeviceMap(layers=tuple(layers), embed=embed, head=head, notes=("manual device map",))


def _show(spec: object) -> str:
    return repr(";".join(spec) if isinstance(spec, (list, tuple)) else spec)


def _gpu_name(kind: str, ordinal: int) -> str:
    return "mps" if kind == "mps" else f"{kind}:{ordinal}"


def _split_entries(spec: object) -> list[str]:
    if isinstance(spec, bool) or not isinstance(spec, (str, int, list, tuple)):
        raise DeviceMapSyntaxError(
            f"device map must be a string like '0:16;1:16', got {spec!r}. {MANUAL_MAP_HELP}"
        )
    if isinstance(spec, int):
        return [str(spec)]
    if isinstance(spec, str):
        items = spec.strip().split(";")
        if len(items) > 1 and items[-1].strip() == "":
            items = items[:-1]  # a trailing ";" is harmless
    else:
        if not all(isinstance(x, str) for x in spec):
            raise DeviceMapSyntaxError(f"device map list must hold strings like '0:16', got {list(spec)!r}")
        items = list(spec)
    entries = [x.strip() for x in items]
    if not entries or entries == [""]:
        raise DeviceMapSyntaxError(f"device map is empty. {MANUAL_MAP_HELP}")
    if "" in entries:
        raise DeviceMapSyntaxError(f"device map {_show(spec)} has an empty entry between ';' separators")
    return entries


def _parse_int(text: str, what: str, entry: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise DeviceMapSyntaxError(
            f"device map entry {entry!r}: the {what} {text.strip()!r} is not an integer. {MANUAL_MAP_HELP}"
        ) from None


def _parse_entry(entry: str, bare: bool) -> tuple[int, int]:
    """ "16" (only as the whole map) -> (0, 16); "1:8" -> (1, 8)."""
    parts = entry.split(":")
    if len(parts) == 1:
        if not bare:
            raise DeviceMapSyntaxError(
                f"device map entry {entry!r} lacks a GPU ordinal: with several entries each one is ORDINAL:LAYERS"
            )
        ordinal, count = 0, _parse_int(parts[0], "layer count", entry)
    elif len(parts) == 2:
        ordinal = _parse_int(parts[0], "GPU ordinal", entry)
        count = _parse_int(parts[1], "layer count", entry)
    else:
        raise DeviceMapSyntaxError(f"device map entry {entry!r} is not ORDINAL:LAYERS. {MANUAL_MAP_HELP}")
    if ordinal < 0:
        raise DeviceMapSyntaxError(
            f"device map entry {entry!r}: the GPU ordinal must be 0 or more, got {ordinal}"
        )
    if count <= 0:
        raise DeviceMapSyntaxError(
            f"device map entry {entry!r}: the layer count must be positive, got {count} "
            "(to leave a GPU out, omit its entry; for automatic mapping, omit -n)"
        )
    return ordinal, count


def _check_ordinals(counts: list[tuple[int, int]], visible_gpus: int, gpu_kind: str) -> None:
    seen: set[int] = set()
    for ordinal, _ in counts:
        if ordinal in seen:
            raise DeviceMapSyntaxError(
                f"device map names GPU {ordinal} twice; give each GPU one ORDINAL:LAYERS entry"
            )
        seen.add(ordinal)
    for ordinal, _ in counts:
        if ordinal >= visible_gpus:
            raise UnknownDeviceError(_not_visible(ordinal, visible_gpus, gpu_kind))


def _not_visible(ordinal: int, visible: int, gpu_kind: str) -> str:
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={cvd!r})" if cvd is not None and gpu_kind == "cuda" else ""
    if visible == 0:
        return f"device map puts layers on GPU {ordinal}, but no GPU is visible{where}; omit -n to run on the CPU"
    names = ", ".join(_gpu_name(gpu_kind, i) for i in range(visible))
    return f"device map names GPU {ordinal}, but only {visible} GPU(s) are visible: {names}{where}"


_manual_note_shown = False


def note_manual_map_once() -> None:
    """The one-time note that automatic mapping is recommended over manual maps (callers: CLI, SDK)."""
    global _manual_note_shown
    if not _manual_note_shown:
        _manual_note_shown = True
        log.warning(
            "manual device maps (-n / device_map=) are deprecated: automatic mapping reserves the KV cache and "
            "activations for you; use --max-seq-len/--max-batch-size/--max-memory to shape it instead"
        )


# ------------------------------------------------------------------ rendering plans

GIB = 1 << 30


def format_gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def format_layers(layers: list[int] | tuple[int, ...]) -> str:
    """'0-13' for a contiguous run; '12,14,16-18' otherwise; '-' when empty."""
    if not layers:
        return "-"
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
